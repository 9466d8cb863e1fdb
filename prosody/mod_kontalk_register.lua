-- mod_kontalk_register: Kontalk's in-band registration (XEP-0077 with Kontalk's forms), relayed
-- to kontalk-registrar (POST /v1/xmpp/relay, see LINK.md). The registrar decides; this module
-- only carries the iq there and the answer back.
--
-- * Client streams that are not authenticated: advertises
--   <register xmlns='http://jabber.org/features/iq-register'/> once the stream is secure (after
--   STARTTLS or on Direct TLS) and relays every jabber:iq:register get/set with the client's TLS
--   certificate (PEM, when one was presented) and address.
-- * Logged-in users (mod_auth_kontalk): relays their jabber:iq:register iqs addressed to the
--   host or to no one (key rollover, <remove/>, private key upload, the registered-user get),
--   with jid = the session's full JID and login_fingerprint = the key it logged in with.
-- * When the registrar cannot be reached, times out or answers anything but 200, the client gets
--   <service-unavailable/> of type 'wait'.
--
-- It replaces Prosody's own registration: do not load mod_register (Debian enables it
-- globally: put "register" and "invites_register" in the host's modules_disabled). If
-- mod_register, mod_register_ibr or mod_user_account_management is loaded on the host an error
-- is logged; this module's handlers run first (priority 10) so they still win.
--
-- Options (per host), read by kontalk_registrar.lib.lua:
--   kontalk_registrar_url      base URL of the registrar   (default "http://127.0.0.1:8080")
--   kontalk_registrar_token    bearer token                (default none)
--   kontalk_registrar_timeout  seconds                     (default 30)
--
-- Relayed stanzas hold phone numbers, codes and keys: they are never logged.

local st = require "util.stanza";
local json = require "util.json";
local xml_parse = require "util.xml".parse;
local jid_bare = require "util.jid".bare;
local modulemanager = require "core.modulemanager";

local registrar = module:require("kontalk_registrar");

local xmlns_register = "jabber:iq:register";
local register_feature = st.stanza("register", { xmlns = "http://jabber.org/features/iq-register" });
local unavailable_text = "The registration service cannot be reached, please try again later";

local conflicting = { register = true, register_ibr = true, user_account_management = true };
local function warn_conflict(name)
	module:log("error", "mod_%s is loaded on %s but mod_kontalk_register replaces it: add \"register\" "
		.. "and \"invites_register\" to this host's modules_disabled", name, module.host);
end
function module.load()
	for name in pairs(conflicting) do
		if modulemanager.is_loaded(module.host, name) then warn_conflict(name); end
	end
end
module:hook("module-loaded", function (event)
	if event.host == module.host and conflicting[event.module] then warn_conflict(event.module); end
end);

module:hook("stream-features", function (event)
	local session = event.origin;
	if session.type == "c2s_unauthed" and session.secure then
		event.features:add_child(register_feature);
	end
end);

-- The registrar's answer, as a stanza to send; false when there is nothing to send; nil and
-- a reason when the relay failed.
local function read_answer(code, body, request)
	if code ~= 200 then
		return nil, code and ("HTTP status " .. code) or tostring(body);
	end
	local data = json.decode(body or "");
	if type(data) ~= "table" then return nil, "answer is not JSON"; end
	if data.stanza == nil or data.stanza == json.null then return false; end
	if type(data.stanza) ~= "string" then return nil, "answer has no stanza"; end
	local reply = xml_parse(data.stanza);
	if not (reply and reply.name == "iq" and reply.attr.id == request.attr.id) then
		return nil, "answer is not an iq with the request's id";
	end
	if reply.attr.xmlns == "jabber:client" then reply.attr.xmlns = nil; end
	return reply;
end

local function relay(session, stanza)
	local request = st.clone(stanza);
	request.attr.xmlns = "jabber:client";
	local cert = registrar.peer_certificate(session);
	local payload = {
		stanza = tostring(request);
		host = module.host;
		client_ip = session.ip;
		certificate = cert and cert:pem() or nil;
		jid = session.full_jid;
		login_fingerprint = session.full_jid and session.kontalk_fingerprint or nil;
	};
	-- While the registrar answers, mod_kontalk_events holds back closing this session: a
	-- rollover's or a removal's own event must not cut off its answer (the new certified key).
	session.kontalk_relays = (session.kontalk_relays or 0) + 1;
	local code, body = registrar.post("/v1/xmpp/relay", json.encode(payload), "application/json");
	session.kontalk_relays = session.kontalk_relays - 1;
	if session.destroyed then return; end
	local reply, err = read_answer(code, body, stanza);
	if reply then
		session.send(reply);
	elseif reply == nil then
		session.log("warn", "Registration relay failed: %s", err);
		session.send(st.error_reply(stanza, "wait", "service-unavailable", unavailable_text));
	end
	local pending = session.kontalk_pending_close;
	if pending and session.kontalk_relays == 0 then
		session.kontalk_pending_close = nil;
		session:close(pending);
	end
end

-- Not authenticated yet: these arrive as stanza/iq/... events on the stream's host.
module:hook("stanza/iq/" .. xmlns_register .. ":query", function (event)
	local session, stanza = event.origin, event.stanza;
	if session.type ~= "c2s_unauthed" then return; end
	if not session.secure then
		session.send(st.error_reply(stanza, "modify", "policy-violation", "Encryption is required"));
		return true;
	end
	relay(session, stanza);
	return true;
end, 10);

-- Logged in: iq/host (to='host') and iq/self (no 'to', or the user's bare JID).
local function authenticated(event)
	local session, stanza = event.origin, event.stanza;
	if session.type ~= "c2s" or session.host ~= module.host then return; end
	local to = stanza.attr.to;
	if to and jid_bare(to) ~= module.host and jid_bare(to) ~= jid_bare(session.full_jid) then return; end
	relay(session, stanza);
	return true;
end
module:hook("iq/host/" .. xmlns_register .. ":query", authenticated, 10);
module:hook("iq/self/" .. xmlns_register .. ":query", authenticated, 10);
