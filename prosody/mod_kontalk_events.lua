-- mod_kontalk_events: ends the sessions of a key that stopped working, on kontalk-registrar's
-- events (key-replaced, key-rolled-over, account-removed; see LINK.md section 3), and tells an
-- account's owner when somebody starts a forced re-registration of its number
-- (reregistration-started: a chat message from the host with the event's text; an event that
-- came as a message from the registrar's component was told by the component itself).
--
-- Every session of the event's JID that logged in (mod_auth_kontalk) with old_fingerprint is
-- closed with a not-authorized stream error; for account-removed every session of the JID, and
-- mod_auth_kontalk forgets the account. Events come at least once: ids already seen are dropped
-- (the last kontalk_events_memory ids are remembered), and so are events older than
-- kontalk_events_max_age. A session with a request at the registrar (the rollover or removal
-- that caused the event) is closed right after its answer is sent.
--
-- Two ways in, use either or both:
-- * webhook: POST on Prosody's HTTP server (mod_http) at kontalk_events_path, signed with
--   "X-Registrar-Signature: sha256=<hex HMAC-SHA256 of the body>". Answers 204 once acted, 401
--   for a missing or wrong signature, 400 for a body it cannot read. Disabled unless
--   kontalk_events_secret is set. mod_http routes by the Host header: a registrar calling
--   http://127.0.0.1:5280/... needs http_default_host = "<this host>" in the global section.
-- * message: <message from='<kontalk_events_from>' to='<host>'><event
--   xmlns='urn:kontalk-registrar:events' id type account jid old-fingerprint new-fingerprint
--   at/></message>, accepted only from that JID (the registrar's Component).
--
-- Options (per host):
--   kontalk_events_secret  HMAC secret of the webhook (registrar events.webhook_secret); no default
--   kontalk_events_path    path of the webhook (default "/kontalk_events"; http_paths also works)
--   kontalk_events_from    JID of the registrar's component allowed to send event messages
--   kontalk_events_memory  how many event ids to remember (default 1000)
--   kontalk_events_max_age seconds after which an event (its `at`) is ignored as a replay
--                          (default 86400; the registrar retries for longer only while
--                          Prosody is down, and a restart ends every session anyway)

local json = require "util.json";
local hashes = require "util.hashes";
local datetime = require "util.datetime";
local cache = require "util.cache";
local jid_split = require "util.jid".prepped_split;
local jid_bare = require "util.jid".bare;
local jid_prep = require "util.jid".prep;
local st = require "util.stanza";
local nodeprep = require "util.encodings".stringprep.nodeprep;

local registrar = module:require("kontalk_registrar");

local secret = module:get_option_string("kontalk_events_secret");
local events_path = module:get_option_string("kontalk_events_path", "/kontalk_events");
local events_from = jid_prep(module:get_option_string("kontalk_events_from"));
local seen = cache.new(module:get_option_number("kontalk_events_memory", 1000));
local max_age = module:get_option_number("kontalk_events_max_age", 86400);

local xmlns_events = "urn:kontalk-registrar:events";
local host_sessions = prosody.hosts[module.host].sessions;

local reasons = {
	["key-replaced"] = { condition = "not-authorized", text = "Your key was replaced" };
	["key-rolled-over"] = { condition = "not-authorized", text = "Your key was rolled over" };
	["account-removed"] = { condition = "not-authorized", text = "Your account was removed" };
};

-- Returns the number of sessions closed. `told` says the owner was already sent the event's text.
local function handle_event(ev, told)
	local reason = reasons[ev.type];
	local notice = ev.type == "reregistration-started";
	if type(ev.id) ~= "string" or not (reason or notice) then
		module:log("debug", "Ignoring event of type %s", tostring(ev.type));
		return 0;
	end
	if seen:get(ev.id) then
		module:log("debug", "Dropping duplicate event %s", ev.id);
		return 0;
	end
	-- A replayed old event (signed, but captured long ago) must not close today's sessions.
	local at = type(ev.at) == "string" and datetime.parse(ev.at);
	if not at or os.time() - at > max_age then
		module:log("warn", "Ignoring event %s: its time %s is missing or older than %d s", ev.id,
			tostring(ev.at), max_age);
		return 0;
	end
	seen:set(ev.id, true);

	local node, host = jid_split(type(ev.jid) == "string" and ev.jid or "");
	if not node and type(ev.account) == "string" then node, host = nodeprep(ev.account), module.host; end
	if not node or host ~= module.host then
		module:log("debug", "Event %s is not for an account of %s", ev.id, module.host);
		return 0;
	end

	if notice then
		if not told and type(ev.text) == "string" then
			module:send(st.message({ from = module.host, to = node .. "@" .. module.host,
				type = "chat", id = "notice-" .. ev.id }):text_tag("body", ev.text));
		end
		module:log("info", "Event %s (%s) for %s", ev.id, ev.type, node);
		return 0;
	end

	local all = ev.type == "account-removed";
	local old = registrar.normalize_fingerprint(ev.old_fingerprint);
	local doomed = {};
	local user = host_sessions[node];
	for _, session in pairs(user and user.sessions or {}) do
		if all or (old and registrar.normalize_fingerprint(session.kontalk_fingerprint) == old) then
			doomed[#doomed + 1] = session;
		end
	end
	for _, session in ipairs(doomed) do
		if (session.kontalk_relays or 0) > 0 then
			-- A request of this session is with the registrar (the rollover or removal that
			-- caused this event): mod_kontalk_register closes it once the answer is sent.
			session.kontalk_pending_close = reason;
		else
			session:close(reason);
		end
	end
	if all then module:fire_event("kontalk-account-removed", { username = node }); end
	module:log("info", "Event %s (%s): closed %d session(s) of %s", ev.id, ev.type, #doomed, node);
	return #doomed;
end

if secret then
	module:depends("http");
	module:provides("http", {
		name = "kontalk_events";
		default_path = events_path;
		route = {
			POST = function (event)
				local request = event.request;
				local body = request.body or "";
				local signature = request.headers.x_registrar_signature;
				local expected = "sha256=" .. hashes.hmac_sha256(secret, body, true);
				if type(signature) ~= "string" or not hashes.equals(signature:lower(), expected) then
					module:log("warn", "Webhook call with a missing or wrong signature from %s", tostring(request.ip));
					return 401;
				end
				local ev = json.decode(body);
				if type(ev) ~= "table" then return 400; end
				handle_event(ev);
				return 204;
			end;
		};
	});
else
	module:log("info", "kontalk_events_secret is not set: the events webhook is disabled");
end

module:hook("message/host", function (event)
	local stanza = event.stanza;
	local ev = stanza:get_child("event", xmlns_events);
	if not ev then return; end
	if not events_from or jid_bare(stanza.attr.from) ~= events_from then
		module:log("warn", "Dropping an event message from %s (kontalk_events_from is %s)",
			tostring(stanza.attr.from), tostring(events_from));
		return true;
	end
	local a = ev.attr;
	handle_event({ id = a.id, type = a.type, account = a.account, jid = a.jid,
		old_fingerprint = a["old-fingerprint"], new_fingerprint = a["new-fingerprint"], at = a.at },
		true);
	return true;
end, 10);
