// The playground's one door to the API: same-origin fetches with the session cookie (never an
// API key), the CSRF token of the sign-in answer on every state-changing request, dry-run
// prices, server-sent events read from a streamed response body, and the balance.

let csrfToken = null;

export class ApiError extends Error {
  constructor(status, type, message) {
    super(message);
    this.status = status;
    this.type = type;
  }
}

async function errorOf(response) {
  let type = 'error';
  let message = `HTTP ${response.status}`;
  try {
    const body = await response.json();
    if (body.error) ({ type, message } = body.error);
    else if (body.data && body.data.message) message = body.data.message; // the tasks routes' shape
  } catch {
    // not JSON: keep the status
  }
  return new ApiError(response.status, type, message);
}

/** fetch() with the cookie, the CSRF token on POST/DELETE, a JSON or multipart body and query.
 *  Answers the response when it is a 2xx, throws an ApiError with the envelope's message otherwise. */
export async function request(method, path, { json, form, query, accept, signal } = {}) {
  const url = new URL(path, location.origin);
  for (const [name, value] of Object.entries(query || {})) url.searchParams.set(name, value);
  const headers = {};
  let body;
  if (json !== undefined) {
    headers['Content-Type'] = 'application/json';
    body = JSON.stringify(json);
  } else if (form) {
    body = form; // the browser writes the multipart boundary
  }
  if (accept) headers.Accept = accept;
  if (method !== 'GET' && method !== 'HEAD' && csrfToken) headers['X-CSRF-Token'] = csrfToken;
  const response = await fetch(url, { method, headers, body, signal, credentials: 'same-origin' });
  if (!response.ok) throw await errorOf(response);
  return response;
}

export async function getJson(path) {
  return (await request('GET', path)).json();
}

/** The signed-in session (it also hands back the CSRF token after a reload), or null. */
export async function currentSession() {
  try {
    const session = await getJson('/v1/session');
    csrfToken = session.csrf_token;
    return session;
  } catch (err) {
    if (err.status === 401) {
      csrfToken = null;
      return null;
    }
    throw err;
  }
}

export async function signIn(name, password) {
  const session = await (await request('POST', '/v1/session', { json: { name, password } })).json();
  csrfToken = session.csrf_token;
  return session;
}

export async function signOut() {
  try {
    await request('DELETE', '/v1/session');
  } finally {
    csrfToken = null;
  }
}

export const account = () => getJson('/v1/account');

/** The price of a request before running it: the same request with ?dry_run=true. */
export async function price(path, payload) {
  const query = { ...(payload.query || {}), dry_run: 'true' };
  const response = await request('POST', path, { json: payload.json, form: payload.form, query });
  return response.json();
}

function parseEvent(block) {
  let event = 'message';
  const data = [];
  for (const line of block.split('\n')) {
    if (!line || line.startsWith(':')) continue;
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'event') event = value;
    else if (field === 'data') data.push(value);
  }
  return data.length ? { event, data: data.join('\n') } : null;
}

/** Server-sent events from a streamed fetch() body: yields {event, data} (data as text). */
export async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    buffer = buffer.replace(/\r\n/g, '\n');
    let end;
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const found = parseEvent(buffer.slice(0, end));
      buffer = buffer.slice(end + 2);
      if (found) yield found;
    }
  }
  const last = parseEvent(buffer.trim());
  if (last) yield last;
}

/** Runs a request that streams `progress` events then `result` (or `error`) with
 *  Accept: text/event-stream; onProgress(step, total) per step; answers the result's body. */
export async function withProgress(method, path, payload, onProgress) {
  const response = await request(method, path, { ...payload, accept: 'text/event-stream' });
  if (!(response.headers.get('Content-Type') || '').startsWith('text/event-stream')) {
    return response.json(); // no progress to report
  }
  for await (const { event, data } of events(response)) {
    const body = JSON.parse(data);
    if (event === 'progress') onProgress(body.step, body.total_steps);
    else if (event === 'result') return body;
    else if (event === 'error') throw new ApiError(500, body.error.type, body.error.message);
  }
  throw new ApiError(500, 'processing_error', 'The stream ended without a result.');
}

/** A stored media URL as a path on this origin (the page's CSP allows only 'self'). */
export function mediaPath(url) {
  const parsed = new URL(url, location.origin);
  return parsed.pathname + parsed.search;
}

/** The answer's timing (milliseconds): its JSON `timing`, else the Server-Timing header. */
export function timingOf(body, response) {
  if (body && body.timing) return body.timing;
  const header = response && response.headers.get('Server-Timing');
  if (!header) return null;
  const timing = {};
  for (const part of header.split(',')) {
    const [name, ...params] = part.trim().split(';');
    const dur = params.find((p) => p.trim().startsWith('dur='));
    if (name && dur) timing[`${name}_ms`] = Number(dur.trim().slice(4));
  }
  return Object.keys(timing).length ? timing : null;
}

/** A File as a data: URL (the JSON routes take files as base64 or data: URLs). */
export function dataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}
