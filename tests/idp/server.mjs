// The OpenID provider the flask_llmauth tests run against: npm `oidc-provider`, configured
// from a JSON document, listening on 127.0.0.1 only.
//
//   node server.mjs --port 9400 [--config idp.json] [--keys keys.json]
//   (or PORT / IDP_CONFIG (JSON text) / IDP_CONFIG_FILE / IDP_KEYS_FILE in the environment)
//
// The issuer is http://127.0.0.1:<port>. Signing keys (RSA 2048 for RS256, P-256 for ES256,
// Ed25519 for EdDSA) are generated at every start, so a restart rotates them, unless --keys
// names a file that exists (it is written on first start when it does not).
//
// Config document:
//   clients: [{client_id, client_secret, grant_types, redirect_uris, response_types, scope,
//              token_endpoint_auth_method,
//              token_claims: {...},          // added to every access token of this client
//              allow_claims_param: true,     // token requests may add `extra_claims` (JSON)
//                                            // and a `ttl` (seconds) of their own
//              default_resource: "urn:..."}] // resource used when a request names none
//   resource_servers: {"<resource indicator>": {format: "jwt"|"opaque", alg: "RS256"|"ES256"|
//              "EdDSA", scope: "a b c", ttl: 600, audience: "..." (default: the indicator)}}
//   accounts: {"<login>": {password, sub (default: login), claims: {...} (id token/userinfo),
//              token_claims: {...} (access tokens)}}
//
// Interactions (login and consent) are handled here instead of the library's
// devInteractions, which accept any password: the login form refuses a wrong one, and
// consent is granted automatically (first-party clients). No page loads anything from
// the network (no web fonts).

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as querystring from 'node:querystring';

import Provider, { errors } from 'oidc-provider';

function arg(name, envName) {
  const i = process.argv.indexOf(`--${name}`);
  if (i !== -1 && i + 1 < process.argv.length) return process.argv[i + 1];
  return envName ? process.env[envName] : undefined;
}

const port = Number(arg('port', 'PORT') || 9400);
const issuer = `http://127.0.0.1:${port}`;

function loadConfig() {
  const file = arg('config', 'IDP_CONFIG_FILE');
  if (file) return JSON.parse(fs.readFileSync(file, 'utf8'));
  if (process.env.IDP_CONFIG) return JSON.parse(process.env.IDP_CONFIG);
  return {};
}

const config = loadConfig();
const clientsById = new Map((config.clients || []).map((c) => [c.client_id, c]));
const resourceServers = config.resource_servers || {};
const accounts = config.accounts || {};
const accountsBySub = new Map(
  Object.entries(accounts).map(([login, a]) => [a.sub || login, { login, ...a }]),
);

function generateKeys() {
  const kid = (prefix) => `${prefix}-${crypto.randomBytes(6).toString('hex')}`;
  const rsa = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey;
  const ec = crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey;
  const ed = crypto.generateKeyPairSync('ed25519').privateKey;
  return [
    { ...rsa.export({ format: 'jwk' }), kid: kid('rsa'), use: 'sig', alg: 'RS256' },
    { ...ec.export({ format: 'jwk' }), kid: kid('ec'), use: 'sig', alg: 'ES256' },
    { ...ed.export({ format: 'jwk' }), kid: kid('ed'), use: 'sig', alg: 'EdDSA' },
  ];
}

function loadKeys() {
  const file = arg('keys', 'IDP_KEYS_FILE');
  if (file && fs.existsSync(file)) return JSON.parse(fs.readFileSync(file, 'utf8')).keys;
  const keys = generateKeys();
  if (file) fs.writeFileSync(file, JSON.stringify({ keys }), { mode: 0o600 });
  return keys;
}

function parseExtraClaims(ctx, client) {
  const body = ctx?.oidc?.body;
  if (!client?.allow_claims_param || !body || body.extra_claims === undefined) return {};
  try {
    const claims = JSON.parse(body.extra_claims);
    if (claims && typeof claims === 'object' && !Array.isArray(claims)) return claims;
  } catch {
    // fall through
  }
  throw new errors.InvalidRequest('extra_claims must be a JSON object');
}

function requestedTtl(ctx, token, fallback) {
  const client = clientsById.get(token.clientId);
  const body = ctx?.oidc?.body;
  if (client?.allow_claims_param && body?.ttl !== undefined) {
    const ttl = Number(body.ttl);
    if (Number.isInteger(ttl) && ttl > 0) return ttl;
    throw new errors.InvalidRequest('ttl must be a positive integer');
  }
  return token.resourceServer?.accessTokenTTL || fallback;
}

const html = (title, body) => `<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>${title}</title>
<style>body{font-family:sans-serif;margin:2em auto;max-width:24em}label,input,button{display:block;margin:.4em 0}</style>
</head><body><h1>${title}</h1>${body}</body></html>`;

const escape = (value) => String(value).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

// Every scope a client or resource server names must be one the provider supports.
const scopes = new Set(['openid', 'offline_access', 'email', 'profile']);
for (const rs of Object.values(resourceServers)) {
  for (const s of (rs.scope || '').split(' ')) if (s) scopes.add(s);
}
for (const c of config.clients || []) {
  for (const s of (c.scope || '').split(' ')) if (s) scopes.add(s);
}

const provider = new Provider(issuer, {
  clients: config.clients || [],
  scopes: [...scopes],
  jwks: { keys: loadKeys() },
  cookies: { keys: [crypto.randomBytes(32).toString('hex')] },
  extraClientMetadata: {
    properties: ['token_claims', 'allow_claims_param', 'default_resource'],
  },
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name', 'groups', 'roles', 'team_id', 'org_id'],
  },
  async findAccount(ctx, sub) {
    const account = accountsBySub.get(sub);
    if (!account) return undefined;
    return {
      accountId: sub,
      async claims() {
        return { sub, ...(account.claims || {}) };
      },
    };
  },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    introspection: { enabled: true },
    revocation: { enabled: true },
    userinfo: { enabled: true },
    rpInitiatedLogout: {
      enabled: true,
      async logoutSource(ctx, form) {
        ctx.body = html('Sign out', `${form}<button form="op.logoutForm" type="submit" value="yes" name="logout">Sign out</button>`);
      },
      async postLogoutSuccessSource(ctx) {
        ctx.body = html('Signed out', '<p>You are signed out.</p>');
      },
    },
    resourceIndicators: {
      enabled: true,
      async defaultResource(ctx, client, oneOf) {
        if (oneOf) return oneOf;
        return clientsById.get(client.clientId)?.default_resource;
      },
      async useGrantedResource() {
        return false;
      },
      async getResourceServerInfo(ctx, indicator) {
        const rs = resourceServers[indicator];
        if (!rs) throw new errors.InvalidTarget();
        const info = {
          scope: rs.scope || '',
          audience: rs.audience || indicator,
          accessTokenTTL: rs.ttl || 600,
          accessTokenFormat: rs.format || 'jwt',
        };
        if (info.accessTokenFormat === 'jwt') info.jwt = { sign: { alg: rs.alg || 'RS256' } };
        return info;
      },
    },
  },
  async extraTokenClaims(ctx, token) {
    const client = clientsById.get(token.clientId);
    const account = token.accountId ? accountsBySub.get(token.accountId) : undefined;
    const claims = {
      ...(client?.token_claims || {}),
      ...(account?.token_claims || {}),
      ...parseExtraClaims(ctx, client),
    };
    return Object.keys(claims).length ? claims : undefined;
  },
  ttl: {
    AccessToken: (ctx, token) => requestedTtl(ctx, token, 600),
    ClientCredentials: (ctx, token) => requestedTtl(ctx, token, 600),
    AuthorizationCode: 60,
    IdToken: 600,
    Interaction: 600,
    Session: 3600,
    Grant: 3600,
  },
  async renderError(ctx, out) {
    ctx.type = 'html';
    ctx.body = html('Error', Object.entries(out)
      .map(([k, v]) => `<p><strong>${escape(k)}</strong>: ${escape(v)}</p>`).join(''));
  },
});

function loginForm(uid, message) {
  return html('Sign in', `${message ? `<p role="alert">${escape(message)}</p>` : ''}
<form method="post" action="/interaction/${escape(uid)}/login" autocomplete="off">
<label>Login <input name="login" required autofocus></label>
<label>Password <input name="password" type="password" required></label>
<button type="submit">Sign in</button></form>`);
}

function safeEqual(a, b) {
  const ha = crypto.createHash('sha256').update(String(a)).digest();
  const hb = crypto.createHash('sha256').update(String(b)).digest();
  return crypto.timingSafeEqual(ha, hb);
}

async function readForm(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > 16384) throw new Error('form too large');
    chunks.push(chunk);
  }
  return querystring.parse(Buffer.concat(chunks).toString('utf8'));
}

function send(res, status, body) {
  res.writeHead(status, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
  res.end(body);
}

async function grantConsent(req, res, interaction) {
  const { prompt: { details }, params, session: { accountId } } = interaction;
  let grant;
  if (interaction.grantId) {
    grant = await provider.Grant.find(interaction.grantId);
  } else {
    grant = new provider.Grant({ accountId, clientId: params.client_id });
  }
  if (details.missingOIDCScope) grant.addOIDCScope(details.missingOIDCScope.join(' '));
  if (details.missingOIDCClaims) grant.addOIDCClaims(details.missingOIDCClaims);
  if (details.missingResourceScopes) {
    for (const [indicator, scopes] of Object.entries(details.missingResourceScopes)) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
  }
  const grantId = await grant.save();
  const result = interaction.grantId ? {} : { consent: { grantId } };
  await provider.interactionFinished(req, res, result, { mergeWithLastSubmission: true });
}

async function handleInteraction(req, res, path) {
  const match = /^\/interaction\/([^/]+)(\/login)?$/.exec(path);
  if (!match) return false;
  const interaction = await provider.interactionDetails(req, res);
  if (interaction.uid !== match[1]) {
    send(res, 400, html('Error', '<p>Unknown interaction.</p>'));
    return true;
  }
  if (req.method === 'GET' && !match[2]) {
    if (interaction.prompt.name === 'login') {
      send(res, 200, loginForm(interaction.uid));
    } else {
      await grantConsent(req, res, interaction);
    }
    return true;
  }
  if (req.method === 'POST' && match[2] && interaction.prompt.name === 'login') {
    const form = await readForm(req);
    const account = accounts[form.login];
    // Compare even for an unknown login so both failures take the same path.
    const ok = safeEqual(account ? account.password : crypto.randomBytes(16).toString('hex'),
      form.password || '') && account !== undefined;
    if (!ok) {
      send(res, 401, loginForm(interaction.uid, 'Invalid login or password.'));
      return true;
    }
    await provider.interactionFinished(req, res, {
      login: { accountId: account.sub || form.login },
    }, { mergeWithLastSubmission: false });
    return true;
  }
  send(res, 405, html('Error', '<p>Method not allowed.</p>'));
  return true;
}

const callback = provider.callback();
const server = http.createServer(async (req, res) => {
  const path = req.url.split('?')[0];
  if (path.startsWith('/interaction/')) {
    try {
      if (await handleInteraction(req, res, path)) return;
    } catch (err) {
      send(res, 400, html('Error', `<p>${escape(err.name || 'error')}</p>`));
      return;
    }
  }
  callback(req, res);
});

server.listen(port, '127.0.0.1', () => {
  process.stdout.write(`oidc-provider listening on ${issuer}\n`);
});

const stop = () => server.close(() => process.exit(0));
process.on('SIGTERM', stop);
process.on('SIGINT', stop);

if (process.env.IDP_DEBUG) {
  for (const event of ['grant.error', 'server_error', 'introspection.error', 'userinfo.error']) {
    provider.on(event, (ctx, err) => process.stderr.write(`${event}: ${err.message} ${err.error_detail || ''}\n`));
  }
}
