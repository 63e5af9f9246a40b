// The Courier console: views of the broker's admin API, polled every
// POLL_MS. Views are rebuilt from data and patched into the page (morph),
// so elements that did not change keep their identity and focus; clicks
// are handled by delegation on the views (data-action), never by
// listeners on rebuilt elements.

import { ApiError, askToken, getJson, postJson, streamEvents } from './api.js';
import { age, h, latency, latencyBars, rate, s, shares, sparkline, topology, when } from './charts.js';

const POLL_MS = 1500;
/** Polls kept for rates and sparklines (a minute). */
const HISTORY_MAX = 40;
/** Polls over which rates and recent latencies are computed (~15 s). */
const WINDOW = 10;
const TAIL_LINES_MAX = 500;

const state = {
  view: 'services',
  services: null,
  names: [],
  topology: [],
  backlog: new Map(),
  deadLetterService: null,
  deadLetters: null,
  purgeArmed: false,
  tail: null,
  busy: false,
};

const $ = (id) => document.getElementById(id);

// ---- patching ------------------------------------------------------------

/** Makes `old` look like `next`, keeping nodes whose tag and key match. */
function morph(old, next) {
  if (old.nodeType !== next.nodeType || old.nodeName !== next.nodeName
      || (old.dataset && old.dataset.key) !== (next.dataset && next.dataset.key)) {
    old.replaceWith(next);
    return;
  }
  if (old.nodeType === Node.TEXT_NODE) {
    if (old.nodeValue !== next.nodeValue) old.nodeValue = next.nodeValue;
    return;
  }
  for (const a of [...old.attributes]) if (!next.hasAttribute(a.name)) old.removeAttribute(a.name);
  for (const a of [...next.attributes]) if (old.getAttribute(a.name) !== a.value) old.setAttribute(a.name, a.value);
  const oldKids = [...old.childNodes];
  const newKids = [...next.childNodes];
  newKids.forEach((kid, i) => {
    if (i < oldKids.length) morph(oldKids[i], kid);
    else old.append(kid);
  });
  for (let i = newKids.length; i < oldKids.length; i++) oldKids[i].remove();
}

/** Replaces the content of container `id` with `nodes`, patching. */
function render(id, ...nodes) {
  const container = $(id);
  const next = h('div', {}, ...nodes);
  const current = container.firstElementChild;
  if (current && container.childNodes.length === 1) morph(current, next);
  else container.replaceChildren(next);
}

function setStatus(text, kind = 'ok') {
  const status = $('status');
  status.textContent = text;
  status.dataset.state = kind;
}

function notice(text, kind = 'info') {
  return h('p', { class: `notice ${kind}` }, text);
}

// ---- polling -------------------------------------------------------------

async function poll() {
  if (state.busy) return;
  state.busy = true;
  try {
    const wants = {
      services: true,
      names: state.view === 'names',
      topology: state.view === 'topology',
    };
    const [services, names, topo] = await Promise.all([
      wants.services ? getJson('/v1/services') : null,
      wants.names ? getJson('/v1/names') : null,
      wants.topology ? getJson('/v1/topology') : null,
    ]);
    if (services) remember(services);
    if (names) push(state.names, names);
    if (topo) push(state.topology, topo);
    if (state.view === 'dead-letters' && state.deadLetterService) await loadDeadLetters();
    draw();
    setStatus(`Updated ${new Date().toLocaleTimeString()}`);
  } catch (e) {
    setStatus(e instanceof ApiError ? `The broker refused: ${e.detail}` : `Cannot reach the broker: ${e.message}`, 'error');
  } finally {
    state.busy = false;
  }
}

function push(list, item) {
  list.push(item);
  if (list.length > HISTORY_MAX) list.shift();
}

function remember(services) {
  state.services = services;
  for (const svc of services.services) {
    if (!state.backlog.has(svc.name)) state.backlog.set(svc.name, []);
    push(state.backlog.get(svc.name), svc.backlog);
  }
}

function draw() {
  switch (state.view) {
    case 'services': return drawServices();
    case 'topology': return drawTopology();
    case 'names': return drawNames();
    case 'subscriptions': return drawSubscriptions();
    case 'dead-letters': return drawDeadLetters();
    default: return undefined;
  }
}

// ---- services ------------------------------------------------------------

function drawServices() {
  if (!state.services) {
    render('services-body', notice('Loading…', 'quiet'));
    return;
  }
  const list = state.services.services;
  if (!list.length) {
    render('services-body', notice('No service yet: none has subscribed or connected since the broker started.'));
    return;
  }
  render('services-body', ...list.map((svc) => h('article', {
    class: 'card', dataset: { test: 'service', service: svc.name, key: svc.name },
  },
  h('h3', {}, svc.name,
    svc.paused.length ? h('span', { class: 'badge warn' }, 'paused') : null,
    svc.dead_letters ? h('span', { class: 'badge bad' }, `${svc.dead_letters} dead`) : null),
  h('dl', { class: 'facts' },
    fact('Subscriptions', svc.patterns.length
      ? svc.patterns.map((p) => `${p.pattern}${p.paused ? ' (paused)' : ''}`).join(', ')
      : 'none (sends only)'),
    fact('Backlog', svc.backlog),
    fact('In flight', svc.in_flight),
    fact('Dead letters', svc.dead_letters),
    fact('Oldest unacked', age(svc.oldest_unacked_seconds))),
  svc.instances.length ? instancesTable(svc) : notice('No instance connected: its messages wait for one.', 'quiet'))));
}

function fact(term, value) {
  return [h('dt', {}, term), h('dd', {}, String(value))];
}

function instancesTable(svc) {
  return h('table', {},
    h('caption', {}, `Instances of ${svc.name}`),
    h('thead', {}, h('tr', {}, ...['Instance', 'Address', 'Connected since', 'In flight', 'Consumes', 'State']
      .map((t) => h('th', { scope: 'col' }, t)))),
    h('tbody', {}, ...svc.instances.map((i) => h('tr', {
      dataset: { test: 'instance', instance: i.instance, key: String(i.connection) },
    },
    h('th', { scope: 'row' }, i.instance),
    h('td', { dataset: { test: 'peer' } }, i.peer || '–'),
    h('td', {}, when(i.connected_at)),
    h('td', {}, `${i.in_flight} / ${i.max_in_flight}`),
    h('td', {}, i.consumes.length ? i.consumes.join(', ') : 'sends only'),
    h('td', {}, i.draining ? 'draining' : i.backpressure ? 'not reading (paused by back-pressure)' : 'ok')))));
}

// ---- topology ------------------------------------------------------------

/** Rates of each flow over the window: {from, to, name, rate, errorRate}. */
function flows() {
  const snaps = state.topology;
  if (!snaps.length) return [];
  const now = snaps[snaps.length - 1];
  const then = snaps[Math.max(0, snaps.length - 1 - WINDOW)];
  const dt = (now.at - then.at) / 1e9;
  const before = new Map(then.edges.map((e) => [`${e.from}|${e.to}|${e.name}`, e]));
  return now.edges.map((e) => {
    const old = before.get(`${e.from}|${e.to}|${e.name}`) || { count: 0, errors: 0 };
    const sent = dt > 0 ? e.count - old.count : 0;
    const errors = dt > 0 ? e.errors - old.errors : 0;
    return {
      ...e,
      rate: dt > 0 ? sent / dt : 0,
      errorRate: sent > 0 ? Math.min(1, errors / sent) : (errors > 0 ? 1 : 0),
    };
  });
}

function drawTopology() {
  const snaps = state.topology;
  if (!snaps.length) return;
  const latest = snaps[snaps.length - 1];
  const list = flows();
  if (!latest.services.length) {
    render('topology-body', notice('No traffic seen yet.'));
    return;
  }
  render('topology-body',
    h('figure', { class: 'graph' }, topology(latest.services, list),
      h('figcaption', {}, 'Rates over the last 15 seconds; red where nacks, dead letters or refusals happened.')),
    h('table', {},
      h('caption', {}, 'Message flows'),
      h('thead', {}, h('tr', {}, ...['From', 'To', 'Name', 'Rate', 'Errors', 'Total'].map((t) => h('th', { scope: 'col' }, t)))),
      h('tbody', {}, ...list.map((f) => h('tr', {
        dataset: { test: 'flow', from: f.from, to: f.to, name: f.name, key: `${f.from}|${f.to}|${f.name}` },
      },
      h('td', {}, f.from), h('td', {}, f.to), h('th', { scope: 'row' }, f.name),
      h('td', {}, rate(f.rate)), h('td', {}, `${(100 * f.errorRate).toFixed(0)}% now, ${f.errors} total`),
      h('td', {}, String(f.count)))))));
}

// ---- names ---------------------------------------------------------------

function byName(snapshot) {
  return new Map(snapshot.names.map((n) => [n.name, n]));
}

/** Recent quantile from the difference of two cumulative bucket lists. */
function recentQuantile(now, then, q) {
  const buckets = now.buckets.map(([le, count], i) => [le, count - (then ? then.buckets[i][1] : 0)]);
  const total = buckets[buckets.length - 1][1];
  if (total <= 0) return null;
  const rank = q * total;
  let belowBound = 0;
  let belowCount = 0;
  for (const [le, count] of buckets) {
    if (count >= rank && count > belowCount) {
      if (le === '+Inf') return belowBound;
      return belowBound + (le - belowBound) * Math.min(1, Math.max(0, (rank - belowCount) / (count - belowCount)));
    }
    if (le !== '+Inf') belowBound = le;
    belowCount = count;
  }
  return belowBound;
}

function drawNames() {
  const snaps = state.names;
  if (!snaps.length) return;
  const latest = snaps[snaps.length - 1];
  if (!latest.names.length) {
    render('names-body', notice('No message sent yet.'));
    return;
  }
  const maps = snaps.map(byName);
  const then = snaps[Math.max(0, snaps.length - 1 - WINDOW)];
  const thenMap = maps[Math.max(0, snaps.length - 1 - WINDOW)];
  const dt = (latest.at - then.at) / 1e9;
  const rows = latest.names.map((n) => {
    const old = thenMap.get(n.name);
    const delta = (field) => (dt > 0 ? (n.totals[field] - (old ? old.totals[field] : 0)) / dt : 0);
    const errors = (t) => t.nacked + t.dead_lettered + t.refused + t.expired;
    const errorRate = dt > 0 ? (errors(n.totals) - (old ? errors(old.totals) : 0)) / dt : 0;
    const series = [];
    for (let i = 1; i < snaps.length; i++) {
      const a = maps[i - 1].get(n.name);
      const b = maps[i].get(n.name);
      const span = (snaps[i].at - snaps[i - 1].at) / 1e9;
      series.push(b && span > 0 ? (b.totals.sent - (a ? a.totals.sent : 0)) / span : 0);
    }
    let p50 = null;
    let p90 = null;
    let p99 = null;
    let scope = 'since start';
    if (n.reply_latency) {
      const oldLatency = old && old.reply_latency;
      const recent = recentQuantile(n.reply_latency, oldLatency, 0.5);
      if (recent !== null && dt > 0) {
        p50 = recent;
        p90 = recentQuantile(n.reply_latency, oldLatency, 0.9);
        p99 = recentQuantile(n.reply_latency, oldLatency, 0.99);
        scope = 'last 15 s';
      } else {
        ({ p50, p90, p99 } = n.reply_latency);
      }
    }
    return h('tr', { dataset: { test: 'name-row', name: n.name, key: n.name } },
      h('th', { scope: 'row' }, n.name),
      h('td', { class: 'num' }, h('span', { dataset: { test: 'sent-rate' } }, rate(delta('sent'))),
        sparkline(series, { label: `${n.name}: sends per second over the last minute` })),
      h('td', { class: 'num' }, rate(delta('delivered'))),
      h('td', { class: errorRate > 0 ? 'num bad' : 'num' }, rate(errorRate)),
      h('td', {}, n.reply_latency
        ? [latencyBars(p50, p90, p99), h('div', { class: 'hint' }, `${scope}, ${n.reply_latency.count} replies`)]
        : h('span', { class: 'quiet' }, '–')),
      h('td', {}, n.outcomes.length
        ? shares(n.outcomes.map((o) => ({ label: o.outcome, count: o.count })), { label: `${n.name}: outcomes` })
        : h('span', { class: 'quiet' }, '–')),
      h('td', { class: 'num' }, `${n.totals.sent} sent, ${n.totals.acked} acked, ${n.totals.nacked} nacked, `
        + `${n.totals.dead_lettered} dead, ${n.totals.refused} refused`));
  });
  render('names-body', h('table', { class: 'names' },
    h('caption', {}, `${latest.names.length} names`),
    h('thead', {}, h('tr', {}, ...['Name', 'Sent', 'Delivered', 'Errors', 'Reply latency', 'Outcomes', 'Totals']
      .map((t) => h('th', { scope: 'col' }, t)))),
    h('tbody', {}, ...rows)),
  latest.names_over_cap ? notice(`${latest.names_over_cap} messages of names past the cap of ${latest.names_max} are counted as _other.`) : null);
}

// ---- subscriptions -------------------------------------------------------

function drawSubscriptions() {
  if (!state.services) {
    render('subscriptions-body', notice('Loading…', 'quiet'));
    return;
  }
  const list = state.services.services.filter((svc) => svc.patterns.length);
  if (!list.length) {
    render('subscriptions-body', notice('No subscription yet.'));
    return;
  }
  render('subscriptions-body', h('table', {},
    h('caption', {}, 'Subscriptions by service'),
    h('thead', {}, h('tr', {}, ...['Service', 'Patterns', 'Backlog', 'In flight', 'Oldest unacked', 'Consumers', '']
      .map((t) => h('th', { scope: 'col' }, t)))),
    h('tbody', {}, ...list.map((svc) => {
      const allPaused = svc.paused.length === svc.patterns.length;
      return h('tr', { dataset: { test: 'subscription', service: svc.name, key: svc.name } },
        h('th', { scope: 'row' }, svc.name),
        h('td', {}, h('ul', { class: 'patterns' }, ...svc.patterns.map((p) => h('li', {
          dataset: { test: 'pattern', pattern: p.pattern, state: p.paused ? 'paused' : 'active', key: p.pattern },
        },
        h('code', {}, p.pattern), ' ',
        h('span', { class: p.paused ? 'badge warn' : 'badge ok', dataset: { test: 'state' } }, p.paused ? 'paused' : 'active'), ' ',
        h('button', {
          type: 'button',
          class: 'small',
          dataset: { action: p.paused ? 'resume' : 'pause', test: p.paused ? 'resume' : 'pause', service: svc.name, pattern: p.pattern },
          'aria-label': `${p.paused ? 'Resume' : 'Pause'} ${svc.name}'s subscription to ${p.pattern}`,
        }, p.paused ? 'Resume' : 'Pause'))))),
        h('td', { class: 'num' }, h('span', { dataset: { test: 'backlog' } }, String(svc.backlog)),
          sparkline(state.backlog.get(svc.name) || [], { width: 100, label: `${svc.name}: backlog over the last minute` })),
        h('td', { class: 'num' }, String(svc.in_flight)),
        h('td', { class: 'num', dataset: { test: 'oldest' } }, age(svc.oldest_unacked_seconds)),
        h('td', { class: 'num' }, `${svc.consumers}${svc.consumers_paused ? ` (${svc.consumers_paused} not reading)` : ''}`),
        h('td', {}, h('button', {
          type: 'button',
          class: 'secondary small',
          dataset: { action: allPaused ? 'resume' : 'pause', test: allPaused ? 'resume-all' : 'pause-all', service: svc.name },
        }, allPaused ? 'Resume all' : 'Pause all')));
    }))));
}

async function pauseOrResume(action, service, pattern) {
  const body = pattern ? { pattern } : {};
  const answer = await postJson(`/v1/subscriptions/${encodeURIComponent(service)}/${action}`, body);
  setStatus(`${service}: ${answer.patterns.join(', ')} ${action === 'pause' ? 'paused' : 'resumed'}`);
}

// ---- dead letters --------------------------------------------------------

async function loadDeadLetters() {
  try {
    state.deadLetters = await getJson(`/v1/dead-letters/${encodeURIComponent(state.deadLetterService)}`);
  } catch (e) {
    if (e instanceof ApiError && e.status === 404) {
      state.deadLetters = { service: state.deadLetterService, total: 0, dead_letters: [] };
    } else {
      throw e;
    }
  }
}

function drawDeadLetters() {
  const withLetters = state.services ? state.services.services.filter((svc) => svc.dead_letters > 0) : [];
  render('dead-letter-services', withLetters.length
    ? h('div', { class: 'choices', role: 'group', 'aria-label': 'Services with dead letters' },
      ...withLetters.map((svc) => h('button', {
        type: 'button',
        class: svc.name === state.deadLetterService ? 'choice selected' : 'choice',
        'aria-pressed': svc.name === state.deadLetterService ? 'true' : 'false',
        dataset: { action: 'dead-letter-service', test: 'dead-letter-service', service: svc.name, key: svc.name },
      }, `${svc.name} (${svc.dead_letters})`)))
    : notice('No dead letters.', 'quiet'));
  const listing = state.deadLetters;
  if (!state.deadLetterService || !listing) {
    render('dead-letters-body');
    return;
  }
  if (!listing.dead_letters.length) {
    render('dead-letters-body', notice(`${listing.service} has no dead letters.`, 'quiet'));
    return;
  }
  render('dead-letters-body', h('table', {},
    h('caption', {}, `Dead letters of ${listing.service}`
      + (listing.total > listing.dead_letters.length ? ` (the oldest ${listing.dead_letters.length} of ${listing.total})` : '')),
    h('thead', {}, h('tr', {}, ...['Id', 'Name', 'Attempts', 'Reason', 'Dead since', ''].map((t) => h('th', { scope: 'col' }, t)))),
    h('tbody', {}, ...listing.dead_letters.map((d) => h('tr', {
      dataset: { test: 'dead-letter', id: String(d.id), key: String(d.id) },
    },
    h('th', { scope: 'row' }, String(d.id)),
    h('td', {}, d.name || '(unreadable)'),
    h('td', { class: 'num' }, String(d.attempts)),
    h('td', {}, d.reason),
    h('td', {}, when(d.dead_lettered_at)),
    h('td', { class: 'actions' },
      h('button', { type: 'button', class: 'secondary small', dataset: { action: 'inspect', test: 'inspect', id: String(d.id) } }, 'Inspect'),
      h('button', { type: 'button', class: 'small', dataset: { action: 'replay', test: 'replay', id: String(d.id) } }, 'Replay'))))),
  ),
  h('div', { class: 'danger-zone' }, state.purgeArmed
    ? [h('button', { type: 'button', class: 'danger', dataset: { action: 'purge-confirm', test: 'purge-confirm' } },
      `Delete all ${listing.total} dead letters of ${listing.service} for good`),
    h('button', { type: 'button', class: 'secondary', dataset: { action: 'purge-cancel', test: 'purge-cancel' } }, 'Keep them')]
    : h('button', { type: 'button', class: 'secondary', dataset: { action: 'purge', test: 'purge' } }, 'Purge all…')));
}

async function inspect(id) {
  const service = state.deadLetterService;
  const d = await getJson(`/v1/dead-letters/${encodeURIComponent(service)}/${id}`);
  const payload = typeof d.payload === 'string' ? d.payload : JSON.stringify(d.payload, null, 2);
  const fields = ['name', 'message_id', 'version', 'sender', 'activity_id', 'key', 'attempts', 'reason'];
  $('dead-letter-detail').replaceChildren(h('article', { class: 'card detail', dataset: { test: 'dead-letter-payload', id: String(id) } },
    h('h3', {}, `Dead letter ${id} of ${service}`),
    h('dl', { class: 'facts' }, ...fields.filter((f) => d[f] !== undefined && d[f] !== null).map((f) => fact(f, d[f])),
      fact('timestamp', when(d.timestamp)),
      ...Object.entries(d.headers || {}).map(([k, v]) => fact(`header ${k}`, v))),
    h('h4', {}, 'Payload'),
    h('pre', { class: 'payload', tabindex: '0' }, payload ?? 'null')));
}

// ---- live tail -----------------------------------------------------------

function tailRow(line) {
  const receivers = Array.isArray(line.receivers) ? line.receivers.join(', ') : '';
  return h('tr', { dataset: { test: 'tail-line', name: line.name, kind: line.kind } },
    h('td', {}, line.timestamp ? new Date(line.timestamp / 1e6).toLocaleTimeString() : ''),
    h('td', {}, h('span', { class: `kind ${line.kind}` }, line.kind)),
    h('th', { scope: 'row' }, line.name),
    h('td', {}, `${line.sender || '?'} → ${receivers || '(nobody)'}`),
    h('td', {}, line.outcome ? `${line.outcome}${line.final === false ? ' (more follow)' : ''}` : ''),
    h('td', { class: 'mono', title: line.activity_id || '' }, (line.activity_id || '').slice(-12)));
}

function tailState(text, kind) {
  const p = $('tail-state');
  p.hidden = false;
  p.textContent = text;
  p.dataset.state = kind;
  p.className = `notice ${kind === 'unavailable' || kind === 'error' ? 'warn' : 'info'}`;
}

function stopTail() {
  if (state.tail) state.tail.abort();
  state.tail = null;
  $('tail-start').disabled = false;
  $('tail-stop').disabled = true;
}

async function startTail(form) {
  stopTail();
  const params = new URLSearchParams();
  for (const field of ['pattern', 'service', 'kind']) {
    const value = form.elements[field].value.trim();
    if (value) params.set(field, value);
  }
  const controller = new AbortController();
  state.tail = controller;
  $('tail-start').disabled = true;
  $('tail-stop').disabled = false;
  const table = h('table', { class: 'tail' },
    h('caption', {}, 'Newest first'),
    h('thead', {}, h('tr', {}, ...['Time', 'Kind', 'Name', 'From → to', 'Outcome', 'Activity'].map((t) => h('th', { scope: 'col' }, t)))),
    h('tbody', {}));
  $('tail-body').replaceChildren(table);
  const body = table.tBodies[0];
  tailState('Connecting…', 'connecting');
  try {
    await streamEvents(`/v1/tail?${params}`, (event, data) => {
      let line;
      try { line = JSON.parse(data); } catch { return; }
      if (event === 'started') {
        tailState(`Following ${line.pattern || '>'}${line.service ? ` for ${line.service}` : ''}${line.kind ? `, ${line.kind}s only` : ''}.`, 'live');
      } else if (event === 'dropped') {
        body.prepend(h('tr', { class: 'dropped' }, h('td', { colspan: '6' }, `${line.dropped} lines skipped: the tail fell behind.`)));
      } else {
        body.prepend(tailRow(line));
        while (body.rows.length > TAIL_LINES_MAX) body.lastElementChild.remove();
      }
    }, controller.signal);
    if (state.tail === controller) tailState('The broker ended the tail.', 'ended');
  } catch (e) {
    if (controller.signal.aborted) {
      tailState('Stopped.', 'stopped');
    } else if (e instanceof ApiError && e.status === 404) {
      $('tail-body').replaceChildren();
      tailState('The live tail is not available on this broker: it serves no /v1/tail endpoint (an older version).', 'unavailable');
    } else {
      tailState(`The tail stopped: ${e.detail || e.message}`, 'error');
    }
  } finally {
    if (state.tail === controller) stopTail();
  }
}

// ---- activity traces -----------------------------------------------------

function traceState(text, kind) {
  const p = $('trace-state');
  p.hidden = !text;
  p.textContent = text || '';
  p.dataset.state = kind || '';
  p.className = `notice ${kind === 'unavailable' || kind === 'error' ? 'warn' : 'info'}`;
}

const first = (o, ...keys) => keys.map((k) => o && o[k]).find((v) => v !== undefined && v !== null);

async function searchTraces(form) {
  const params = new URLSearchParams();
  for (const field of ['name', 'outcome', 'since']) {
    const value = form.elements[field].value.trim();
    if (value) params.set(field, value);
  }
  $('trace-detail').replaceChildren();
  let answer;
  try {
    answer = await getJson(`/v1/activities?${params}`);
  } catch (e) {
    $('trace-list').replaceChildren();
    if (e instanceof ApiError && e.status === 404) {
      traceState('Activity traces are not available on this broker: it serves no /v1/activities endpoint (an older version).', 'unavailable');
    } else {
      traceState(`The search failed: ${e.detail || e.message}`, 'error');
    }
    return;
  }
  const list = Array.isArray(answer) ? answer : (first(answer, 'activities', 'items') || []);
  traceState(list.length ? '' : 'No activity matches.', 'empty');
  $('trace-list').replaceChildren(h('ul', { class: 'traces' }, ...list.map((a) => {
    const id = first(a, 'activity_id', 'id');
    const started = first(a, 'started_at', 'timestamp', 'started', 'at');
    const outcome = first(a, 'outcome', 'outcomes');
    const count = first(a, 'messages', 'count', 'message_count');
    return h('li', {}, h('button', { type: 'button', class: 'choice', dataset: { action: 'open-trace', test: 'trace', id } },
      `${first(a, 'name', 'first_name') || id}`,
      started ? ` · ${when(started)}` : '',
      outcome ? ` · ${Array.isArray(outcome) ? outcome.join(', ') : outcome}` : '',
      typeof count === 'number' ? ` · ${count} messages` : ''));
  })));
}

/** The tree's nodes, depth first, with their depth. */
function flatten(nodes, depth = 0, out = []) {
  for (const node of nodes) {
    out.push({ node, depth });
    const kids = first(node, 'children', 'caused', 'replies') || [];
    flatten(Array.isArray(kids) ? kids : [], depth + 1, out);
  }
  return out;
}

/** What became of each delivery of a traced message, e.g. `todo: acked`. */
function deliveryOutcomes(node) {
  const deliveries = Array.isArray(node.deliveries) ? node.deliveries : [];
  if (!deliveries.length) return first(node, 'outcome', 'result') || '';
  return deliveries.map((d) => {
    const attempt = d.attempt > 1 ? ` (attempt ${d.attempt})` : '';
    // Replies are not acked: delivered is their last word.
    const open = node.kind === 'reply' ? 'delivered' : 'in flight';
    const outcome = d.outcome || (d.delivered_at ? open : 'waiting');
    return `${d.service || '?'}: ${outcome}${attempt}`;
  }).join('; ');
}

async function openTrace(id) {
  let tree;
  try {
    tree = await getJson(`/v1/activities/${encodeURIComponent(id)}`);
  } catch (e) {
    $('trace-detail').replaceChildren(notice(e.status === 404 ? `No activity ${id} on this broker.` : `Cannot load the activity: ${e.detail || e.message}`, 'warn'));
    return;
  }
  const roots = Array.isArray(tree) ? tree : (first(tree, 'roots', 'tree', 'messages') || [first(tree, 'root') || tree]);
  const rows = flatten(Array.isArray(roots) ? roots : [roots]);
  const time = (n) => Number(first(n, 'timestamp', 'at', 'accepted_at') || 0);
  const times = rows.map((r) => time(r.node)).filter((t) => t > 0);
  const t0 = Math.min(...times);
  const span = Math.max(1, Math.max(...times) - t0);
  const width = 420;
  $('trace-detail').replaceChildren(h('article', { class: 'card', dataset: { test: 'trace-timeline', id } },
    h('h3', {}, `Activity ${id}`),
    h('p', { class: 'hint' }, `${rows.length} messages over ${latency(span / 1e9)}; each bar starts when the broker accepted the message.`),
    h('table', { class: 'timeline' },
      h('thead', {}, h('tr', {}, ...['Message', 'From → to', 'Outcome', 'At', ''].map((t) => h('th', { scope: 'col' }, t)))),
      h('tbody', {}, ...rows.map(({ node, depth }) => {
        const t = time(node);
        const x = t ? ((t - t0) / span) * (width - 8) : 0;
        const receivers = first(node, 'receivers', 'to');
        return h('tr', { dataset: { test: 'trace-node', name: first(node, 'name') || '' } },
          h('th', { scope: 'row', class: `depth d${Math.min(depth, 8)}` }, h('span', { class: `kind ${node.kind || ''}` }, node.kind || ''), ' ', first(node, 'name') || '?'),
          h('td', {}, `${first(node, 'sender', 'from') || '?'} → ${Array.isArray(receivers) ? receivers.join(', ') : (receivers || '–')}`),
          h('td', {}, deliveryOutcomes(node)),
          h('td', { class: 'num' }, t ? `+${latency((t - t0) / 1e9)}` : '–'),
          h('td', {}, s('svg', { width, height: 12, class: 'lane', 'aria-hidden': 'true' },
            s('rect', { x: x.toFixed(1), y: 2, width: 8, height: 8, rx: 2, class: `mark ${node.kind || ''}` }))));
      })))));
  $('trace-detail').scrollIntoView({ block: 'start' });
}

// ---- navigation and actions ---------------------------------------------

function showView() {
  const wanted = (location.hash || '#services').slice(1);
  const known = [...document.querySelectorAll('[data-view]')].map((v) => v.dataset.view);
  state.view = known.includes(wanted) ? wanted : 'services';
  for (const section of document.querySelectorAll('[data-view]')) section.hidden = section.dataset.view !== state.view;
  for (const link of document.querySelectorAll('[data-view-link]')) {
    if (link.dataset.viewLink === state.view) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
  draw();
  poll();
}

async function act(button) {
  const { action, service, pattern, id } = button.dataset;
  button.disabled = true;
  try {
    switch (action) {
      case 'pause':
      case 'resume':
        await pauseOrResume(action, service, pattern);
        break;
      case 'dead-letter-service':
        state.deadLetterService = service;
        state.deadLetters = null;
        state.purgeArmed = false;
        $('dead-letter-detail').replaceChildren();
        await loadDeadLetters();
        break;
      case 'inspect':
        await inspect(id);
        break;
      case 'replay': {
        const svc = state.deadLetterService;
        await postJson(`/v1/dead-letters/${encodeURIComponent(svc)}/${id}/replay`);
        $('dead-letter-detail').replaceChildren(notice(`Dead letter ${id} is back in ${svc}'s queue.`, 'ok'));
        break;
      }
      case 'purge':
        state.purgeArmed = true;
        break;
      case 'purge-cancel':
        state.purgeArmed = false;
        break;
      case 'purge-confirm': {
        const svc = state.deadLetterService;
        const answer = await postJson(`/v1/dead-letters/${encodeURIComponent(svc)}/purge`);
        state.purgeArmed = false;
        $('dead-letter-detail').replaceChildren(notice(`${answer.purged} dead letters of ${svc} deleted.`, 'ok'));
        break;
      }
      case 'open-trace':
        await openTrace(id);
        break;
      default:
        return;
    }
  } catch (e) {
    setStatus(e instanceof ApiError ? `Refused: ${e.detail}` : `Failed: ${e.message}`, 'error');
  } finally {
    button.disabled = false;
  }
  draw();
  poll();
}

function start() {
  document.querySelector('main').addEventListener('click', (event) => {
    const button = event.target.closest('button[data-action]');
    if (button) act(button);
  });
  $('tail-form').addEventListener('submit', (event) => {
    event.preventDefault();
    startTail(event.target);
  });
  $('tail-stop').addEventListener('click', stopTail);
  $('trace-form').addEventListener('submit', (event) => {
    event.preventDefault();
    searchTraces(event.target);
  });
  $('token-button').addEventListener('click', async () => {
    if (await askToken()) poll();
  });
  window.addEventListener('hashchange', showView);
  showView();
  setInterval(poll, POLL_MS);
}

start();
