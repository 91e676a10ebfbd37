// A real OAuth 2.1 authorization server for the tests: oidc-provider with the client_credentials
// grant and resource indicators (RFC 8707), issuing RS256-signed JWT access tokens whose `aud` is
// the resource the client asked for.
//
// Usage: node server.mjs CONFIG_JSON
//   CONFIG_JSON: {"port": 0, "clients": [{"client_id", "client_secret", "scope", "ttl"}]}
// Prints one JSON line on stdout once listening: {"issuer": "http://127.0.0.1:PORT"}.
import { generateKeyPairSync, randomUUID } from "node:crypto";
import http from "node:http";
import Provider from "oidc-provider";

const config = JSON.parse(process.argv[2] ?? "{}");
const ttlOf = new Map(config.clients.map((c) => [c.client_id, c.ttl ?? 300]));
const resourceScopes = "images:generate images:read";

// A fresh signing key per start: a restarted server has a key (kid) the resource server never saw.
const { privateKey } = generateKeyPairSync("rsa", { modulusLength: 2048 });
const jwk = { ...privateKey.export({ format: "jwk" }), kid: randomUUID(), alg: "RS256", use: "sig" };

const server = http.createServer();
server.listen(config.port ?? 0, "127.0.0.1", () => {
  const issuer = `http://127.0.0.1:${server.address().port}`;
  const provider = new Provider(issuer, {
    clients: config.clients.map((c) => ({
      client_id: c.client_id,
      client_secret: c.client_secret,
      grant_types: ["client_credentials"],
      redirect_uris: [],
      response_types: [],
      token_endpoint_auth_method: "client_secret_post",
      scope: c.scope,
    })),
    jwks: { keys: [jwk] },
    scopes: ["images:generate", "images:read", "other:thing"],
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        getResourceServerInfo: (ctx, resourceIndicator, client) => ({
          scope: resourceScopes + " other:thing",
          audience: resourceIndicator,
          accessTokenTTL: ttlOf.get(client.clientId) ?? 300,
          accessTokenFormat: "jwt",
          jwt: { sign: { alg: "RS256" } },
        }),
      },
    },
  });
  provider.on("server_error", (ctx, err) => console.error("server_error", err));
  server.on("request", provider.callback());
  console.log(JSON.stringify({ issuer }));
});

for (const signal of ["SIGTERM", "SIGINT"]) process.on(signal, () => server.close(() => process.exit(0)));
