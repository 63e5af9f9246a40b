// The broker's admin API as the console uses it: JSON over fetch, an
// admin token from session storage (asked for when a call answers 401),
// and Server-Sent Events read from a fetch stream.
//
// The live tail is read with fetch rather than EventSource: EventSource
// can send no Authorization header (so it could not work under a
// manifest) and does not tell the answer's status (so a broker without
// the endpoint could not be told from a network failure).

const TOKEN_KEY = 'courier.admin-token';

/** An answer other than 2xx; `detail` is the problem document's. */
export class ApiError extends Error {
  constructor(status, detail) {
    super(detail || `HTTP ${status}`);
    this.status = status;
    this.detail = detail || `HTTP ${status}`;
  }
}

let asking = null;

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

/** Opens the token dialog; resolves when a token was given. */
export function askToken(reason) {
  if (asking) return asking;
  const dialog = document.getElementById('token-dialog');
  const input = document.getElementById('token-input');
  document.getElementById('token-reason').textContent = reason ? `The broker said: ${reason}` : '';
  input.value = '';
  asking = new Promise((resolve) => {
    dialog.addEventListener('close', () => {
      asking = null;
      const given = input.value.trim();
      if (dialog.returnValue === 'save' && given) {
        sessionStorage.setItem(TOKEN_KEY, given);
        resolve(true);
      } else {
        resolve(false);
      }
    }, { once: true });
  });
  dialog.showModal();
  input.focus();
  return asking;
}

function headers(extra) {
  const h = { Accept: 'application/json', ...extra };
  const t = token();
  if (t) h.Authorization = `Bearer ${t}`;
  return h;
}

async function detailOf(res) {
  const text = await res.text();
  try {
    const problem = JSON.parse(text);
    return problem.detail || problem.title || text;
  } catch {
    return text;
  }
}

/** Sends a request; on 401 asks for a token and tries again. */
async function send(path, init) {
  for (;;) {
    const res = await fetch(path, { ...init, headers: headers(init.headers) });
    if (res.status !== 401) return res;
    const detail = await detailOf(res);
    if (!(await askToken(detail))) throw new ApiError(401, detail);
  }
}

/** GET a JSON document. */
export async function getJson(path) {
  const res = await send(path, { method: 'GET' });
  if (!res.ok) throw new ApiError(res.status, await detailOf(res));
  return res.json();
}

/** POST a JSON body; the answer's JSON. */
export async function postJson(path, body = {}) {
  const res = await send(path, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify(body),
  });
  if (!res.ok) throw new ApiError(res.status, await detailOf(res));
  return res.json();
}

/**
 * Reads Server-Sent Events from `path` until `signal` aborts or the
 * stream ends: `onEvent(name, data)` for each. Throws an ApiError for an
 * answer that is not a stream (404 when the broker has no such endpoint).
 */
export async function streamEvents(path, onEvent, signal) {
  const res = await send(path, { method: 'GET', headers: { Accept: 'text/event-stream' }, signal });
  if (!res.ok) throw new ApiError(res.status, await detailOf(res));
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    // Events end with a blank line; a CR may end a chunk, so normalise
    // only what is complete.
    buffer = buffer.replace(/\r\n/g, '\n');
    let end;
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = 'message';
      const data = [];
      for (const line of block.split('\n')) {
        if (line.startsWith(':')) continue;
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        let val = colon < 0 ? '' : line.slice(colon + 1);
        if (val.startsWith(' ')) val = val.slice(1);
        if (field === 'event') name = val;
        else if (field === 'data') data.push(val);
      }
      if (data.length) onEvent(name, data.join('\n'));
    }
  }
}
