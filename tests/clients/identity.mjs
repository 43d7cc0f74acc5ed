// @azure/identity's ManagedIdentityCredential, as a Node app would use it: reads the managed
// identity environment (IDENTITY_ENDPOINT + IDENTITY_HEADER, or AZURE_POD_IDENTITY_AUTHORITY_HOST
// for IMDS), gets one token and prints {"token", "expiresOnTimestamp"} as JSON.
// AZGATE_IDENTITY_OPTIONS: {"scope": ..., "clientId"?: ..., "resourceId"?: ..., "objectId"?: ...}
import { createRequire } from "node:module";
import path from "node:path";

// Resolved from NODE_PATH's directory (.tools/node/node_modules), not from this file's.
const require = createRequire(path.join(process.cwd(), "package.json"));
const { ManagedIdentityCredential } = require("@azure/identity");

const options = JSON.parse(process.env.AZGATE_IDENTITY_OPTIONS || "{}");
const { scope, ...identity } = options;
const credential = new ManagedIdentityCredential(identity);
try {
  const token = await credential.getToken(scope);
  console.log(JSON.stringify({ token: token.token, expiresOnTimestamp: token.expiresOnTimestamp }));
} catch (error) {
  console.error(String(error && error.stack ? error.stack : error));
  process.exit(1);
}
