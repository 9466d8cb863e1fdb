-- mod_auth_kontalk: authentication provider for a Kontalk host (authentication = "kontalk").
--
-- Kontalk clients log in with the TLS client certificate they got at registration (an
-- "OpenPGP to X.509 bridge" certificate). This provider offers SASL EXTERNAL and nothing else,
-- and only to client streams that presented a certificate: Smack, Kontalk's XMPP library, would
-- pick any password mechanism over EXTERNAL. The certificate is judged by kontalk-registrar
-- (POST /v1/login-certificates/verify, see LINK.md), which names the account:
--   200 -> the session logs in as that account on this host (the JID's domain must be the host;
--          an authzid other than empty or "=" must equal the JID); the key's fingerprint is kept
--          as session.kontalk_fingerprint for mod_kontalk_register and mod_kontalk_events;
--   403 -> not-authorized; anything else, a timeout or no answer -> temporary-auth-failure.
--
-- Accounts: Prosody asks the provider whether a user exists before storing offline messages
-- (mod_message) and for roster, PEP and blocklist decisions. The registrar owns the accounts,
-- but that question is synchronous, so this provider remembers every account that logged in
-- (store "kontalk_accounts": fingerprint and time of the last login) and user_exists() answers
-- from it; mod_kontalk_events forgets an account on "account-removed". A registered account
-- that never logged in is unknown here until its first login (the Kontalk client logs in right
-- after registering). Passwords do not exist: every password function refuses.
--
-- Options (per host), read by kontalk_registrar.lib.lua:
--   kontalk_registrar_url, kontalk_registrar_token, kontalk_registrar_timeout

local json = require "util.json";
local jid_prepped_split = require "util.jid".prepped_split;
local jid_prep = require "util.jid".prep;
local nodeprep = require "util.encodings".stringprep.nodeprep;

local registrar = module:require("kontalk_registrar");
local accounts = module:open_store("kontalk_accounts");

-- SASL: a minimal handler with the interface mod_saslauth uses (mechanisms, select, process,
-- clean_clone, username). util.sasl's EXTERNAL profile cannot say temporary-auth-failure.
local handler = {};
local handler_mt = { __index = handler };

local function new_handler(session)
	return setmetatable({ session = session }, handler_mt);
end

function handler:clean_clone()
	return new_handler(self.session);
end

function handler:mechanisms()
	if registrar.peer_certificate(self.session) then
		return { EXTERNAL = true };
	end
	return {};
end

function handler:select(mechanism)
	if not self.selected and mechanism == "EXTERNAL" and registrar.peer_certificate(self.session) then
		self.selected = mechanism;
		return true;
	end
end

local refusals = {
	["not-certified"] = "This key is not certified by this server";
	["key-replaced"] = "This key was replaced";
	["unknown-account"] = "This account does not exist";
};

function handler:process(authzid)
	local session = self.session;
	if authzid == nil then
		if not self.challenged then
			self.challenged = true;
			return "challenge", ""; -- no initial response: ask for one (RFC 6120 6.4.2)
		end
		authzid = ""; -- an empty response to that challenge
	end
	local cert = registrar.peer_certificate(session);
	if not cert then
		return "failure", "not-authorized", "A client certificate is required";
	end

	local code, body = registrar.post("/v1/login-certificates/verify", cert:pem(), "application/x-pem-file");
	if session.destroyed then return "failure", "temporary-auth-failure", "Connection gone"; end
	local data = code and json.decode(body or "");
	if code == 403 then
		local check = type(data) == "table" and data.check;
		session.log("info", "Login refused by the registrar: %s", tostring(check or "no reason"));
		return "failure", "not-authorized", refusals[check] or "This certificate cannot log in";
	elseif code ~= 200 or type(data) ~= "table" then
		session.log("warn", "Login check failed: %s", code and ("HTTP status " .. code) or tostring(body));
		return "failure", "temporary-auth-failure", "The login service cannot be reached, please try again later";
	end

	local node, host = jid_prepped_split(type(data.jid) == "string" and data.jid or "");
	if not node or host ~= module.host or (type(data.account) == "string" and nodeprep(data.account) ~= node) then
		session.log("warn", "Login check named an account that is not on %s", module.host);
		return "failure", "not-authorized", "This certificate is not for this server";
	end
	if authzid ~= "" and authzid ~= "=" and jid_prep(authzid) ~= node .. "@" .. host then
		return "failure", "invalid-authzid", "The authorization identity must be your JID or empty";
	end

	if type(data.fingerprint) ~= "string" or data.fingerprint == "" then
		-- Without it the session could neither be ended on a key change nor be checked by the
		-- registrar on its requests: no login.
		session.log("warn", "Login check answered without the key's fingerprint");
		return "failure", "temporary-auth-failure", "The login service answered incompletely";
	end
	self.username = node;
	session.kontalk_fingerprint = data.fingerprint;
	local ok, err = accounts:set(node, { fingerprint = session.kontalk_fingerprint, last_login = os.time() });
	if not ok then session.log("warn", "Could not record account %s: %s", node, tostring(err)); end
	return "success";
end

-- The provider.
local provider = {};
local no_passwords = "Kontalk accounts have no password: log in with your certificate (SASL EXTERNAL)";

function provider.test_password() return nil, no_passwords; end
function provider.get_password() return nil, no_passwords; end
function provider.set_password() return nil, no_passwords; end
function provider.create_user() return nil, "Accounts are created by registering (kontalk-registrar)"; end

function provider.user_exists(username)
	return accounts:get(username) ~= nil;
end

function provider.delete_user(username)
	return accounts:set(username, nil);
end

function provider.users()
	return accounts:users();
end

function provider.get_sasl_handler(session)
	return new_handler(session);
end

-- XEP-0198 resumption moves the new connection into the old session: it now holds the key
-- the new connection logged in with.
module:hook("smacks-hibernation-end", function (event)
	event.resumed.kontalk_fingerprint = event.origin.kontalk_fingerprint;
end);

module:hook("kontalk-account-removed", function (event)
	accounts:set(event.username, nil);
end);

module:provides("auth", provider);
