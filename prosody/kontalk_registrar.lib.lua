-- kontalk_registrar.lib.lua: the HTTP link to kontalk-registrar (see LINK.md), shared by
-- mod_kontalk_register and mod_auth_kontalk through module:require("kontalk_registrar").
-- It runs in the requiring module's environment, so the options are read per host:
--
--   kontalk_registrar_url     base URL of the registrar (default "http://127.0.0.1:8080")
--   kontalk_registrar_token   bearer token sent as "Authorization: Bearer ..." (default none:
--                             the registrar then relies on its login.allowed_ips)
--   kontalk_registrar_timeout seconds to wait for an answer (default 30: a registration start
--                             waits for the SMS provider)
--
-- post() must be called from an async runner (Prosody 0.12 runs every c2s stanza handler,
-- SASL included, in the session's runner): it pauses the session's connection, not the server.
-- The token is never logged.

local http = require "net.http";
local async = require "util.async";
local timer = require "util.timer";

local base_url = module:get_option_string("kontalk_registrar_url", "http://127.0.0.1:8080"):gsub("/+$", "");
local token = module:get_option_string("kontalk_registrar_token");
local timeout = module:get_option_number("kontalk_registrar_timeout", 30);

-- POST body to base_url..path; returns status code and body, or nil and a reason
-- ("timeout", "connection refused", ...).
local function post(path, body, content_type)
	if not async.ready() then
		return nil, "not in an async context";
	end
	local wait, done = async.waiter();
	local code, answer, finished;
	local function finish(c, a)
		if finished then return; end
		finished, code, answer = true, c, a;
		done();
	end
	local headers = { ["Content-Type"] = content_type, ["Accept"] = "application/json" };
	if token then headers["Authorization"] = "Bearer " .. token; end
	local req = http.request(base_url .. path, { method = "POST", body = body, headers = headers },
		function (response_body, status)
			if status == 0 then -- net.http reports connection failures as code 0
				finish(nil, response_body or "connection failed");
			else
				finish(status, response_body);
			end
		end);
	local timeout_task = timer.add_task(timeout, function ()
		if finished then return; end
		finish(nil, "timeout");
		if type(req) == "table" and req.cancel then req:cancel("timeout"); end
	end);
	wait();
	timer.stop(timeout_task);
	return code, answer;
end

-- The client's TLS certificate (a LuaSec x509 object) or nil. In 0.12 conn:ssl() is only a
-- boolean; the LuaSec socket is conn:socket() (after STARTTLS too).
local function peer_certificate(session)
	local conn = session.conn;
	local sock = conn and conn.socket and conn:socket();
	if not (sock and sock.getpeercertificate) then return nil; end
	return sock:getpeercertificate();
end

-- Fingerprints are compared as bare upper-case hex.
local function normalize_fingerprint(fp)
	if type(fp) ~= "string" then return nil; end
	fp = fp:gsub("[%s:]", ""):upper();
	if fp == "" then return nil; end
	return fp;
end

return {
	post = post;
	peer_certificate = peer_certificate;
	normalize_fingerprint = normalize_fingerprint;
	timeout = timeout;
};
