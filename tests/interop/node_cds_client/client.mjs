#!/usr/bin/env node
// An independent CDS Hooks 2.0 client, written from the specification
// (https://cds-hooks.hl7.org/2.0/) and sharing no code with the project it tests.
//
//   node client.mjs --service BASE --fhir FHIRBASE --patient ID --key KEY.jwk.json \
//        --iss ISS --token ACCESS_TOKEN --scenario discovery|patient-view|order-select|attacks|cors
//
// It prints one JSON object to stdout describing what it observed. Conformance problems are
// listed as strings that start with the number of the CDS Hooks 2.0 requirement they break
// (numbers from the HL7/Inferno requirements list, e.g. "[req 83]"). The exit status is 0 when
// the scenario ran (whatever it found) and 2 when it could not run at all.

import { randomUUID, webcrypto } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';

// jose uses the global Web Crypto API. Node 20+ has it; Node 18 (Debian 12's nodejs package)
// only has node:crypto.webcrypto, so install it first and load jose after that.
if (globalThis.crypto === undefined) globalThis.crypto = webcrypto;
const { SignJWT, exportSPKI, generateKeyPair, importJWK } = await import('jose');

const HTTP_TIMEOUT_MS = 20000;
const JWT_LIFETIME_S = 300;
const INDICATORS = new Set(['info', 'warning', 'critical']);
const LINK_TYPES = new Set(['absolute', 'smart']);
const SELECTION_BEHAVIORS = new Set(['at-most-one', 'any']);
const ACTION_TYPES = new Set(['create', 'update', 'delete']);
const USER_TOKENS = {
  userPractitionerId: 'Practitioner/',
  userPractitionerRoleId: 'PractitionerRole/',
  userPatientId: 'Patient/',
  userRelatedPersonId: 'RelatedPerson/',
};
// Root-level primitive context fields of the hooks this client knows (CDS Hooks hook library).
// Only these may appear as {{context.x}} prefetch tokens (req 57): draftOrders and selections
// are not primitives.
const PRIMITIVE_CONTEXT = {
  'patient-view': new Set(['userId', 'patientId', 'encounterId']),
  'order-select': new Set(['userId', 'patientId', 'encounterId']),
  'order-sign': new Set(['userId', 'patientId', 'encounterId']),
};
const CPT = 'http://www.ama-assn.org/go/cpt';

// -- command line ---------------------------------------------------------------------------
function options() {
  const { values } = parseArgs({
    options: {
      service: { type: 'string' },
      fhir: { type: 'string' },
      patient: { type: 'string' },
      key: { type: 'string' },
      iss: { type: 'string' },
      token: { type: 'string' },
      scenario: { type: 'string' },
      user: { type: 'string', default: 'Practitioner/example' },
      scope: { type: 'string', default: 'patient/ImagingStudy.rs' },
      subject: { type: 'string', default: 'cds-interop-node-client' },
      'expires-in': { type: 'string', default: '300' },
      origin: { type: 'string', default: 'https://ehr.interop.example' },
    },
    strict: true,
  });
  const required = ['service', 'scenario'];
  if (values.scenario !== 'discovery' && values.scenario !== 'cors') {
    required.push('fhir', 'patient', 'key', 'iss', 'token');
  }
  const missing = required.filter((name) => !values[name]);
  if (missing.length) throw new Error(`missing option(s): ${missing.map((m) => `--${m}`).join(' ')}`);
  values.service = values.service.replace(/\/+$/, '');
  if (values.fhir) values.fhir = values.fhir.replace(/\/+$/, '');
  return values;
}

// -- HTTP -----------------------------------------------------------------------------------
async function http(method, url, { headers = {}, body } = {}) {
  const init = { method, headers: { ...headers }, signal: AbortSignal.timeout(HTTP_TIMEOUT_MS) };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers['Content-Type'] = 'application/json';
  }
  const response = await fetch(url, init);
  const text = await response.text();
  let json;
  try {
    json = text ? JSON.parse(text) : undefined;
  } catch {
    json = undefined;
  }
  return { status: response.status, headers: response.headers, text, json };
}

// -- JWT (CDS Hooks 2.0 "Trusting CDS Clients") ----------------------------------------------
function loadKey(path) {
  const jwk = JSON.parse(readFileSync(path, 'utf8'));
  if (jwk.kty !== 'EC' || jwk.crv !== 'P-384' || !jwk.d) {
    throw new Error(`${path} is not an EC P-384 private JWK`);
  }
  if (!jwk.kid) throw new Error(`${path} has no kid`);
  const { d: _private, ...publicJwk } = jwk;
  return { jwk, publicJwk, kid: jwk.kid };
}

function claims(iss, aud, changes = {}) {
  const now = Math.floor(Date.now() / 1000);
  return { iss, aud, iat: now, exp: now + JWT_LIFETIME_S, jti: randomUUID(), ...changes };
}

async function signES384(privateJwk, kid, payload) {
  const key = await importJWK(privateJwk, 'ES384');
  return new SignJWT(payload).setProtectedHeader({ alg: 'ES384', typ: 'JWT', kid }).sign(key);
}

function b64url(value) {
  return Buffer.from(typeof value === 'string' ? value : JSON.stringify(value)).toString('base64url');
}

// -- prefetch (CDS Hooks 2.0 "Prefetch Template" / "Prefetch tokens") --------------------------
const TOKEN = /\{\{\s*([^{}]*?)\s*\}\}/g;

function tokenValues(context) {
  const values = {};
  for (const [name, value] of Object.entries(context)) {
    if (['string', 'number', 'boolean'].includes(typeof value)) values[`context.${name}`] = String(value);
  }
  const user = typeof context.userId === 'string' ? context.userId : '';
  for (const [token, prefix] of Object.entries(USER_TOKENS)) {
    if (user.startsWith(prefix)) values[token] = user.slice(prefix.length);
  }
  return values;
}

/** The query with its tokens filled, or null when a token has no value in this context. */
function renderTemplate(template, context) {
  const values = tokenValues(context);
  let missing = false;
  const rendered = template.replace(TOKEN, (_, name) => {
    if (!(name in values)) {
      missing = true;
      return '';
    }
    return encodeURIComponent(values[name]);
  });
  return missing ? null : rendered;
}

async function computePrefetch(templates, context, fhir, accessToken) {
  const prefetch = {};
  const report = {};
  for (const [key, template] of Object.entries(templates || {})) {
    const query = renderTemplate(template, context);
    if (query === null) {
      report[key] = { template, skipped: 'a token has no value in this context' };
      continue;
    }
    const url = `${fhir}/${query.replace(/^\//, '')}`;
    const response = await http('GET', url, {
      headers: { Accept: 'application/fhir+json', Authorization: `Bearer ${accessToken}` },
    });
    report[key] = { query, status: response.status };
    if (response.status === 404) {
      prefetch[key] = null; // nothing found: the spec's null
    } else if (response.json && typeof response.json === 'object') {
      // A result, or the FHIR server's OperationOutcome passed on as the spec says.
      if (response.status === 200 || response.json.resourceType === 'OperationOutcome') {
        prefetch[key] = response.json;
        if (response.json.resourceType === 'Bundle') {
          report[key].entries = (response.json.entry || []).length;
        }
      }
    }
  }
  return { prefetch, report };
}

// -- validators -----------------------------------------------------------------------------
function isEmpty(value) {
  if (value === null || value === '') return true;
  if (Array.isArray(value)) return value.length === 0;
  return typeof value === 'object' && Object.keys(value).length === 0;
}

/** Req 3: no null or empty JSON element anywhere, except the paths in `allowed`. */
function findNullOrEmpty(value, path, problems, allowed = new Set()) {
  if (isEmpty(value) && !allowed.has(path)) {
    problems.push(`[req 3] ${path} is ${JSON.stringify(value)} (null/empty JSON elements are not allowed)`);
    return;
  }
  if (Array.isArray(value)) {
    value.forEach((item, i) => findNullOrEmpty(item, `${path}[${i}]`, problems, allowed));
  } else if (value && typeof value === 'object') {
    for (const [name, item] of Object.entries(value)) {
      findNullOrEmpty(item, `${path}.${name}`, problems, allowed);
    }
  }
}

function isString(value) {
  return typeof value === 'string' && value.length > 0;
}

function isAbsoluteUrl(value) {
  if (!isString(value)) return false;
  try {
    const url = new URL(value);
    return url.protocol === 'http:' || url.protocol === 'https:';
  } catch {
    return false;
  }
}

function checkJsonContentType(response, where, problems) {
  const type = response.headers.get('content-type') || '';
  if (!/^application\/([a-z0-9.+-]*\+)?json\b/i.test(type)) {
    problems.push(`[req 1] ${where}: Content-Type is ${JSON.stringify(type)}, not JSON`);
  }
}

function validateDiscovery(response) {
  const problems = [];
  const notes = [];
  if (response.status !== 200) problems.push(`[req 13] discovery answered HTTP ${response.status}`);
  checkJsonContentType(response, 'discovery', problems);
  const body = response.json;
  if (!body || typeof body !== 'object' || !Array.isArray(body.services)) {
    problems.push('[req 6] discovery body is not an object with a services array');
    return { problems, notes, services: [] };
  }
  findNullOrEmpty(body, '$', problems, new Set(['$.services']));
  const ids = new Set();
  body.services.forEach((service, i) => {
    const at = `services[${i}]`;
    if (!service || typeof service !== 'object') {
      problems.push(`[req 6] ${at} is not an object`);
      return;
    }
    if (!isString(service.hook)) problems.push(`[req 7] ${at}.hook must be a string`);
    if (!isString(service.description)) problems.push(`[req 9] ${at}.description must be a string`);
    if (!isString(service.id)) problems.push(`[req 10] ${at}.id must be a string`);
    else if (ids.has(service.id)) notes.push(`${at}.id ${service.id} appears more than once`);
    else ids.add(service.id);
    if (isString(service.id) && encodeURIComponent(service.id) !== service.id) {
      notes.push(`${at}.id ${JSON.stringify(service.id)} needs escaping in a URL path`);
    }
    if (service.title !== undefined && !isString(service.title)) {
      problems.push(`[req 8] ${at}.title must be a string`);
    }
    if (service.title === undefined) notes.push(`[req 8] ${at} has no title (RECOMMENDED)`);
    if (service.usageRequirements !== undefined && !isString(service.usageRequirements)) {
      problems.push(`[req 12] ${at}.usageRequirements must be a string`);
    }
    if (service.prefetch === undefined) return;
    if (!service.prefetch || typeof service.prefetch !== 'object' || Array.isArray(service.prefetch)) {
      problems.push(`[req 11] ${at}.prefetch must be an object`);
      return;
    }
    const primitive = PRIMITIVE_CONTEXT[service.hook];
    for (const [key, template] of Object.entries(service.prefetch)) {
      const where = `${at}.prefetch.${key}`;
      if (!isString(template)) {
        problems.push(`[req 11] ${where} must be a string (a FHIR query)`);
        continue;
      }
      for (const [, token] of template.matchAll(TOKEN)) {
        if (token in USER_TOKENS) continue;
        const match = /^context\.([A-Za-z0-9_-]+)$/.exec(token);
        if (!match) {
          problems.push(`[req 56] ${where}: {{${token}}} is neither context.<field> nor a user token`);
        } else if (primitive && !primitive.has(match[1])) {
          problems.push(
            `[req 57] ${where}: {{${token}}} is not a root-level primitive ${service.hook} context field`,
          );
        }
      }
      const leftover = template.replace(TOKEN, '');
      if (leftover.includes('{{') || leftover.includes('}}')) {
        problems.push(`[req 55] ${where}: unbalanced {{ }} token delimiters`);
      }
      if (/^https?:/i.test(template)) {
        problems.push(`[req 11] ${where}: a prefetch template is relative to the FHIR base, not a URL`);
      }
    }
  });
  return { problems, notes, services: body.services };
}

function validateCoding(coding, where, problems, { displayRequired = false } = {}) {
  if (!coding || typeof coding !== 'object' || Array.isArray(coding)) {
    problems.push(`${where} must be a Coding object`);
    return;
  }
  if (!isString(coding.code)) problems.push(`[req 216] ${where}.code must be a string`);
  if (!isString(coding.system)) problems.push(`[req 217] ${where}.system must be a string`);
  if (displayRequired && !isString(coding.display)) {
    problems.push(`[req 100] ${where}.display is required`);
  } else if (coding.display !== undefined && !isString(coding.display)) {
    problems.push(`${where}.display must be a string`);
  }
}

function validateCard(card, at, problems) {
  if (!card || typeof card !== 'object' || Array.isArray(card)) {
    problems.push(`[req 74] ${at} is not an object`);
    return;
  }
  if (card.uuid !== undefined && !isString(card.uuid)) problems.push(`[req 80] ${at}.uuid must be a string`);
  if (!isString(card.summary)) {
    problems.push(`[req 83] ${at}.summary must be a string`);
  } else if ([...card.summary].length >= 140) {
    problems.push(`[req 83] ${at}.summary has ${[...card.summary].length} characters (must be < 140)`);
  }
  if (card.detail !== undefined && !isString(card.detail)) problems.push(`[req 85] ${at}.detail must be a string`);
  if (!INDICATORS.has(card.indicator)) {
    problems.push(`[req 88] ${at}.indicator ${JSON.stringify(card.indicator)} is not info|warning|critical`);
  }
  const source = card.source;
  if (!source || typeof source !== 'object' || Array.isArray(source)) {
    problems.push(`[req 90] ${at}.source is required and must be an object`);
  } else {
    if (!isString(source.label)) problems.push(`[req 105] ${at}.source.label must be a string`);
    if (source.url !== undefined && !isAbsoluteUrl(source.url)) {
      problems.push(`[req 107] ${at}.source.url must be an absolute URL`);
    }
    if (source.icon !== undefined && !isAbsoluteUrl(source.icon)) {
      problems.push(`[req 111] ${at}.source.icon must be an absolute URL`);
    }
    if (source.topic !== undefined) validateCoding(source.topic, `${at}.source.topic`, problems);
  }
  if (card.suggestions !== undefined) {
    if (!Array.isArray(card.suggestions)) {
      problems.push(`[req 92] ${at}.suggestions must be an array`);
    } else {
      if (!SELECTION_BEHAVIORS.has(card.selectionBehavior)) {
        problems.push(`[req 93/95] ${at}.selectionBehavior must be at-most-one|any when suggestions are present`);
      }
      card.suggestions.forEach((suggestion, j) => validateSuggestion(suggestion, `${at}.suggestions[${j}]`, problems));
    }
  } else if (card.selectionBehavior !== undefined && !SELECTION_BEHAVIORS.has(card.selectionBehavior)) {
    problems.push(`[req 95] ${at}.selectionBehavior must be at-most-one|any`);
  }
  if (card.overrideReasons !== undefined) {
    if (!Array.isArray(card.overrideReasons)) problems.push(`[req 98] ${at}.overrideReasons must be an array`);
    else {
      card.overrideReasons.forEach((reason, j) =>
        validateCoding(reason, `${at}.overrideReasons[${j}]`, problems, { displayRequired: true }),
      );
    }
  }
  if (card.links !== undefined) {
    if (!Array.isArray(card.links)) problems.push(`[req 103] ${at}.links must be an array`);
    else card.links.forEach((link, j) => validateLink(link, `${at}.links[${j}]`, problems));
  }
}

function validateSuggestion(suggestion, at, problems) {
  if (!suggestion || typeof suggestion !== 'object') {
    problems.push(`[req 92] ${at} is not an object`);
    return;
  }
  if (!isString(suggestion.label)) problems.push(`[req 117] ${at}.label must be a string`);
  if (suggestion.uuid !== undefined && !isString(suggestion.uuid)) problems.push(`[req 119] ${at}.uuid must be a string`);
  if (suggestion.isRecommended !== undefined && typeof suggestion.isRecommended !== 'boolean') {
    problems.push(`[req 121] ${at}.isRecommended must be a boolean`);
  }
  if (suggestion.actions === undefined) return;
  if (!Array.isArray(suggestion.actions)) {
    problems.push(`[req 124] ${at}.actions must be an array`);
    return;
  }
  suggestion.actions.forEach((action, k) => {
    const where = `${at}.actions[${k}]`;
    if (!ACTION_TYPES.has(action?.type)) problems.push(`[req 127] ${where}.type must be create|update|delete`);
    if (!isString(action?.description)) problems.push(`[req 128] ${where}.description must be a string`);
    if ((action?.type === 'create' || action?.type === 'update') && !isString(action?.resource?.resourceType)) {
      problems.push(`[req 131/132] ${where}.resource must be a FHIR resource`);
    }
    if (action?.type === 'delete' && action?.resource !== undefined && typeof action.resource === 'string') {
      problems.push(`[req 133] ${where}: a delete names its target in resourceId, not resource`);
    }
    if (action?.resourceId !== undefined && !isString(action.resourceId)) {
      problems.push(`[req 135] ${where}.resourceId must be a string`);
    }
  });
}

function validateLink(link, at, problems) {
  if (!link || typeof link !== 'object' || Array.isArray(link)) {
    problems.push(`[req 103] ${at} is not an object`);
    return;
  }
  if (!isString(link.label)) problems.push(`[req 138] ${at}.label must be a string`);
  if (!isString(link.url)) problems.push(`[req 139] ${at}.url must be a URL string`);
  if (!LINK_TYPES.has(link.type)) problems.push(`[req 142] ${at}.type ${JSON.stringify(link.type)} is not absolute|smart`);
  if (link.type === 'absolute' && !isAbsoluteUrl(link.url)) {
    problems.push(`[req 142] ${at}.url must be an absolute URL for an absolute link`);
  }
  if (link.appContext !== undefined) {
    if (typeof link.appContext !== 'string') problems.push(`[req 144] ${at}.appContext must be a string`);
    if (link.type !== 'smart') problems.push(`[req 146/147] ${at}.appContext is only allowed on smart links`);
  }
}

function validateHookResponse(response) {
  const problems = [];
  if (response.status !== 200) {
    problems.push(`[req 74] the service answered HTTP ${response.status}`);
    return problems;
  }
  checkJsonContentType(response, 'hook response', problems);
  const body = response.json;
  if (!body || typeof body !== 'object' || !Array.isArray(body.cards)) {
    problems.push('[req 74] the response is not an object with a cards array');
    return problems;
  }
  findNullOrEmpty(body, '$', problems, new Set(['$.cards']));
  body.cards.forEach((card, i) => validateCard(card, `cards[${i}]`, problems));
  const uuids = body.cards.map((card) => card?.uuid).filter((uuid) => uuid !== undefined);
  if (new Set(uuids).size !== uuids.length) problems.push('[req 80] card uuids are not unique');
  if (body.systemActions !== undefined && !Array.isArray(body.systemActions)) {
    problems.push('[req 75] systemActions must be an array');
  }
  return problems;
}

// -- scenarios ------------------------------------------------------------------------------
async function discover(opts) {
  const response = await http('GET', `${opts.service}/cds-services`, { headers: { Accept: 'application/json' } });
  return { response, ...validateDiscovery(response) };
}

async function discoveryScenario(opts) {
  const { response, problems, notes, services } = await discover(opts);
  return {
    scenario: 'discovery',
    url: `${opts.service}/cds-services`,
    status: response.status,
    valid: problems.length === 0,
    services: services.map((s) => ({ id: s?.id, hook: s?.hook, prefetch: s?.prefetch })),
    problems,
    notes,
  };
}

function draftOrder(patient) {
  return {
    resourceType: 'ServiceRequest',
    id: `draft-${randomUUID()}`,
    status: 'draft',
    intent: 'order',
    code: {
      coding: [{ system: CPT, code: '71046', display: 'Radiologic examination, chest; 2 views' }],
      text: 'XR Chest 2 views',
    },
    subject: { reference: `Patient/${patient}` },
  };
}

function hookContext(hook, opts) {
  const context = { userId: opts.user, patientId: opts.patient };
  if (hook === 'order-select' || hook === 'order-sign') {
    const order = draftOrder(opts.patient);
    context.draftOrders = { resourceType: 'Bundle', type: 'collection', entry: [{ resource: order }] };
    if (hook === 'order-select') context.selections = [`ServiceRequest/${order.id}`];
  }
  return context;
}

async function buildRequest(service, opts) {
  const context = hookContext(service.hook, opts);
  const { prefetch, report } = await computePrefetch(service.prefetch, context, opts.fhir, opts.token);
  const body = {
    hook: service.hook,
    hookInstance: randomUUID(),
    fhirServer: opts.fhir,
    fhirAuthorization: {
      access_token: opts.token,
      token_type: 'Bearer',
      expires_in: Number(opts['expires-in']),
      scope: opts.scope,
      subject: opts.subject,
      patient: opts.patient,
    },
    context,
  };
  if (Object.keys(prefetch).length) body.prefetch = prefetch;
  return { body, prefetchReport: report };
}

async function findService(opts, hook) {
  const discovery = await discover(opts);
  const service = discovery.services.find((s) => s && s.hook === hook);
  if (!service) throw new Error(`discovery lists no ${hook} service`);
  return service;
}

async function hookScenario(opts, hook) {
  const service = await findService(opts, hook);
  const url = `${opts.service}/cds-services/${encodeURIComponent(service.id)}`;
  const { body, prefetchReport } = await buildRequest(service, opts);
  const key = loadKey(opts.key);
  const jwt = await signES384(key.jwk, key.kid, claims(opts.iss, url));
  const started = Date.now();
  const response = await http('POST', url, {
    headers: { Authorization: `Bearer ${jwt}`, Accept: 'application/json' },
    body,
  });
  const elapsedMs = Date.now() - started;
  const problems = validateHookResponse(response);
  return {
    scenario: hook,
    service: service.id,
    url,
    status: response.status,
    elapsedMs,
    prefetch: prefetchReport,
    sentPrefetchKeys: Object.keys(body.prefetch || {}),
    cards: response.json?.cards ?? [],
    problems,
    ...(response.status === 200 ? {} : { body: response.json ?? response.text }),
  };
}

async function attacksScenario(opts) {
  const service = await findService(opts, 'patient-view');
  const url = `${opts.service}/cds-services/${encodeURIComponent(service.id)}`;
  const key = loadKey(opts.key);
  const { body } = await buildRequest(service, opts);
  const now = Math.floor(Date.now() / 1000);
  const post = async (authorization) => {
    const headers = { Accept: 'application/json' };
    if (authorization !== undefined) headers.Authorization = authorization;
    // A fresh hookInstance per call, like a client would send.
    return (await http('POST', url, { headers, body: { ...body, hookInstance: randomUUID() } })).status;
  };
  const valid = () => claims(opts.iss, url);

  const publicJson = JSON.stringify(key.publicJwk);
  const publicPem = await exportSPKI(await importJWK(key.publicJwk, 'ES384'));
  const hs256 = (secret) =>
    new SignJWT(valid())
      .setProtectedHeader({ alg: 'HS256', typ: 'JWT', kid: key.kid })
      .sign(new TextEncoder().encode(secret));
  const foreign = await generateKeyPair('ES384', { extractable: true });
  const unsigned = `${b64url({ alg: 'none', typ: 'JWT', kid: key.kid })}.${b64url(valid())}.`;

  const tokens = {
    no_authorization: undefined,
    alg_none: `Bearer ${unsigned}`,
    hs256_public_jwk_as_secret: `Bearer ${await hs256(publicJson)}`,
    hs256_public_pem_as_secret: `Bearer ${await hs256(publicPem)}`,
    wrong_aud_discovery_url: `Bearer ${await signES384(key.jwk, key.kid, claims(opts.iss, `${opts.service}/cds-services`))}`,
    wrong_aud_other_service: `Bearer ${await signES384(key.jwk, key.kid, claims(opts.iss, `${url}-other`))}`,
    expired: `Bearer ${await signES384(key.jwk, key.kid, claims(opts.iss, url, { iat: now - 900, exp: now - 600 }))}`,
    untrusted_iss: `Bearer ${await signES384(key.jwk, key.kid, claims('https://attacker.invalid', url))}`,
    foreign_key_same_kid: `Bearer ${await new SignJWT(valid())
      .setProtectedHeader({ alg: 'ES384', typ: 'JWT', kid: key.kid })
      .sign(foreign.privateKey)}`,
    not_bearer_scheme: `Basic ${Buffer.from('user:pass').toString('base64')}`,
  };
  const results = {};
  for (const [name, authorization] of Object.entries(tokens)) {
    results[name] = await post(authorization);
  }
  const replayed = `Bearer ${await signES384(key.jwk, key.kid, valid())}`;
  const replay = { first: await post(replayed), second: await post(replayed) };
  return { scenario: 'attacks', service: service.id, url, results, replay };
}

async function corsScenario(opts) {
  const discovery = await discover(opts);
  const service = discovery.services.find((s) => s && isString(s.id));
  const urls = [`${opts.service}/cds-services`];
  if (service) {
    const url = `${opts.service}/cds-services/${encodeURIComponent(service.id)}`;
    urls.unshift(url);
    urls.push(`${url}/feedback`);
  }
  const problems = [];
  const results = [];
  for (const url of urls) {
    const response = await http('OPTIONS', url, {
      headers: {
        Origin: opts.origin,
        'Access-Control-Request-Method': url.endsWith('/cds-services') ? 'GET' : 'POST',
        'Access-Control-Request-Headers': 'authorization, content-type',
      },
    });
    const headers = {};
    for (const name of [
      'access-control-allow-origin',
      'access-control-allow-methods',
      'access-control-allow-headers',
      'access-control-max-age',
      'access-control-allow-credentials',
      'vary',
    ]) {
      const value = response.headers.get(name);
      if (value !== null) headers[name] = value;
    }
    results.push({ url, status: response.status, headers });
    const at = `OPTIONS ${url}`;
    if (response.status < 200 || response.status > 299) problems.push(`[req 208] ${at} answered ${response.status}`);
    const origin = headers['access-control-allow-origin'];
    if (origin !== '*' && origin !== opts.origin) {
      problems.push(`[req 208] ${at}: Access-Control-Allow-Origin ${JSON.stringify(origin)} does not admit ${opts.origin}`);
    }
    const allowed = (headers['access-control-allow-headers'] || '').toLowerCase().split(/\s*,\s*/);
    for (const name of ['authorization', 'content-type']) {
      if (!allowed.includes(name) && !allowed.includes('*')) {
        problems.push(`[req 208] ${at}: Access-Control-Allow-Headers lacks ${name}`);
      }
    }
    const method = url.endsWith('/cds-services') ? 'GET' : 'POST';
    const methods = (headers['access-control-allow-methods'] || '').toUpperCase().split(/\s*,\s*/);
    if (!methods.includes(method) && !methods.includes('*')) {
      problems.push(`[req 208] ${at}: Access-Control-Allow-Methods lacks ${method}`);
    }
  }
  return { scenario: 'cors', origin: opts.origin, status: results[0]?.status, results, problems };
}

const SCENARIOS = {
  discovery: discoveryScenario,
  'patient-view': (opts) => hookScenario(opts, 'patient-view'),
  'order-select': (opts) => hookScenario(opts, 'order-select'),
  attacks: attacksScenario,
  cors: corsScenario,
};

async function main() {
  let opts;
  try {
    opts = options();
    const scenario = SCENARIOS[opts.scenario];
    if (!scenario) throw new Error(`unknown scenario ${opts.scenario}; one of ${Object.keys(SCENARIOS).join(', ')}`);
    process.stdout.write(`${JSON.stringify(await scenario(opts))}\n`);
  } catch (error) {
    process.stdout.write(`${JSON.stringify({ scenario: opts?.scenario, error: String(error?.stack || error) })}\n`);
    process.exitCode = 2;
  }
}

await main();
