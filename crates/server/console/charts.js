// Small DOM and SVG helpers and the console's charts, hand-drawn in SVG:
// sparklines, stacked shares, latency bars and the topology graph.

const SVG_NS = 'http://www.w3.org/2000/svg';

/** An HTML element: h('td', {class: 'x', dataset: {test: 'y'}}, 'text', child…). */
export function h(tag, attrs = {}, ...children) {
  return build(document.createElement(tag), attrs, children);
}

/** An SVG element, like h(). */
export function s(tag, attrs = {}, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

function build(node, attrs, children) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'dataset') {
      for (const [k, v] of Object.entries(value)) node.dataset[k] = v;
    } else if (key.startsWith('on') && typeof value === 'function') {
      node.addEventListener(key.slice(2), value);
    } else if (key === 'text') {
      node.textContent = value;
    } else {
      node.setAttribute(key, value === true ? '' : String(value));
    }
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** A rate as people read it: 0, 0.25/s, 12/s, 1.2k/s. */
export function rate(perSecond) {
  if (!Number.isFinite(perSecond) || perSecond <= 0) return '0/s';
  if (perSecond >= 1000) return `${(perSecond / 1000).toFixed(1)}k/s`;
  if (perSecond >= 10) return `${perSecond.toFixed(0)}/s`;
  return `${perSecond.toFixed(perSecond >= 1 ? 1 : 2)}/s`;
}

/** Seconds as a latency: 120 µs, 3.4 ms, 1.20 s. */
export function latency(secondsValue) {
  if (secondsValue === null || secondsValue === undefined) return '–';
  if (secondsValue < 0.001) return `${(secondsValue * 1e6).toFixed(0)} µs`;
  if (secondsValue < 1) return `${(secondsValue * 1e3).toFixed(secondsValue < 0.01 ? 2 : 1)} ms`;
  return `${secondsValue.toFixed(2)} s`;
}

/** A duration in whole units: 5 s, 3 min, 2 h. */
export function age(secondsValue) {
  if (secondsValue === null || secondsValue === undefined) return '–';
  if (secondsValue < 60) return `${secondsValue.toFixed(secondsValue < 10 ? 1 : 0)} s`;
  if (secondsValue < 3600) return `${Math.floor(secondsValue / 60)} min`;
  if (secondsValue < 86400) return `${Math.floor(secondsValue / 3600)} h`;
  return `${Math.floor(secondsValue / 86400)} d`;
}

/** A unix time in nanoseconds as local date and time. */
export function when(nanos) {
  if (!nanos) return '–';
  return new Date(nanos / 1e6).toLocaleString();
}

/** A line of recent values, newest on the right. */
export function sparkline(values, { width = 140, height = 28, label = '' } = {}) {
  const max = Math.max(1e-9, ...values);
  const step = values.length > 1 ? width / (values.length - 1) : width;
  const points = values.map((v, i) => `${(i * step).toFixed(1)},${(height - 2 - (v / max) * (height - 4)).toFixed(1)}`);
  const svg = s('svg', { class: 'spark', width, height, viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-label': label });
  svg.append(s('title', { text: label }));
  if (points.length > 1) {
    svg.append(s('polyline', { points: `0,${height} ${points.join(' ')} ${width},${height}`, class: 'spark-area' }));
    svg.append(s('polyline', { points: points.join(' '), class: 'spark-line' }));
  }
  return svg;
}

const SHARE_CLASSES = ['c0', 'c1', 'c2', 'c3', 'c4', 'c5'];

/** Shares of a whole as one stacked bar, with a legend. */
export function shares(parts, { width = 200, label = 'shares' } = {}) {
  const total = parts.reduce((sum, p) => sum + p.count, 0);
  const box = h('div', { class: 'shares' });
  const svg = s('svg', { width, height: 12, viewBox: `0 0 ${width} 12`, role: 'img', 'aria-label': label });
  let x = 0;
  const legend = h('ul', { class: 'legend' });
  parts.forEach((p, i) => {
    const w = total ? (p.count / total) * width : 0;
    const cls = SHARE_CLASSES[i % SHARE_CLASSES.length];
    const pct = total ? Math.round((100 * p.count) / total) : 0;
    svg.append(s('rect', { x: x.toFixed(1), y: 0, width: Math.max(0, w).toFixed(1), height: 12, class: cls },
      s('title', { text: `${p.label}: ${p.count} (${pct}%)` })));
    x += w;
    legend.append(h('li', { dataset: { outcome: p.label } }, h('span', { class: `swatch ${cls}`, 'aria-hidden': 'true' }), `${p.label} ${pct}%`));
  });
  box.append(svg, legend);
  return box;
}

/** p50, p90 and p99 as three bars on one log scale (100 µs … 60 s). */
export function latencyBars(p50, p90, p99, { width = 150 } = {}) {
  const lo = Math.log10(1e-4);
  const hi = Math.log10(60);
  const scale = (v) => (v ? Math.max(2, ((Math.log10(Math.max(v, 1e-4)) - lo) / (hi - lo)) * width) : 0);
  const rows = [['p50', p50], ['p90', p90], ['p99', p99]];
  const svg = s('svg', { class: 'latency', width: width + 70, height: 36, role: 'img',
    'aria-label': rows.map(([k, v]) => `${k} ${latency(v)}`).join(', ') });
  rows.forEach(([k, v], i) => {
    const y = i * 12;
    svg.append(s('text', { x: 0, y: y + 9, class: 'axis', text: k }));
    svg.append(s('rect', { x: 26, y: y + 2, width: scale(v).toFixed(1), height: 8, class: `bar ${k}` }));
    svg.append(s('text', { x: 30 + scale(v), y: y + 9, class: 'value', text: latency(v) }));
  });
  return svg;
}

/**
 * The services as nodes on a circle and, per pair of services, one arrow
 * labelled with each message name between them. `edges`: {from, to, name,
 * rate, errorRate}; an arrow pair in both directions bends apart.
 */
export function topology(services, edges, { width = 900, height = 560 } = {}) {
  const svg = s('svg', { class: 'topology', viewBox: `0 0 ${width} ${height}`, role: 'img',
    'aria-label': `Topology: ${services.length} services, ${edges.length} message flows` });
  svg.append(s('defs', {},
    s('marker', { id: 'arrow', viewBox: '0 0 10 10', refX: 10, refY: 5, markerWidth: 8, markerHeight: 8, orient: 'auto-start-reverse' },
      s('path', { d: 'M0,0 L10,5 L0,10 z', class: 'arrowhead' }))));
  const cx = width / 2;
  const cy = height / 2;
  const radius = Math.min(width, height) / 2 - 90;
  const at = new Map();
  // Two services side by side; more around a circle from the top.
  const start = services.length === 2 ? Math.PI : -Math.PI / 2;
  services.forEach((name, i) => {
    const angle = (2 * Math.PI * i) / Math.max(1, services.length) + start;
    const r = services.length === 1 ? 0 : radius * (services.length === 2 ? 1.4 : 1);
    at.set(name, { x: cx + r * Math.cos(angle), y: cy + r * Math.sin(angle) });
  });
  const pairs = new Map();
  for (const e of edges) {
    const key = `${e.from}\u0000${e.to}`;
    if (!pairs.has(key)) pairs.set(key, { from: e.from, to: e.to, flows: [] });
    pairs.get(key).flows.push(e);
  }
  const edgeLayer = s('g', { class: 'edges' });
  const labelLayer = s('g', { class: 'labels' });
  const NODE_W = 120;
  const NODE_H = 36;
  for (const pair of pairs.values()) {
    const a = at.get(pair.from);
    const b = at.get(pair.to);
    if (!a || !b) continue;
    const failing = pair.flows.some((f) => f.errorRate > 0);
    const group = s('g', { class: failing ? 'edge failing' : 'edge', dataset: { test: 'edge', from: pair.from, to: pair.to } });
    let d;
    let mid;
    // Which way the label moves off the line: outwards, so that the labels
    // of an arrow pair in both directions do not cover each other.
    let away = { x: 0, y: 0 };
    if (pair.from === pair.to) {
      d = `M${a.x - 20},${a.y - NODE_H / 2} C${a.x - 60},${a.y - 110} ${a.x + 60},${a.y - 110} ${a.x + 20},${a.y - NODE_H / 2}`;
      mid = { x: a.x, y: a.y - 95 };
    } else {
      const back = pairs.has(`${pair.to}\u0000${pair.from}`);
      const dx = b.x - a.x;
      const dy = b.y - a.y;
      const len = Math.hypot(dx, dy) || 1;
      const bend = back ? 50 : 0;
      if (back) away = { x: -dy / len, y: dx / len };
      const ctrl = { x: (a.x + b.x) / 2 - (dy / len) * bend, y: (a.y + b.y) / 2 + (dx / len) * bend };
      const start = border(a, ctrl, NODE_W, NODE_H);
      const end = border(b, ctrl, NODE_W, NODE_H);
      d = `M${start.x.toFixed(1)},${start.y.toFixed(1)} Q${ctrl.x.toFixed(1)},${ctrl.y.toFixed(1)} ${end.x.toFixed(1)},${end.y.toFixed(1)}`;
      mid = { x: 0.25 * start.x + 0.5 * ctrl.x + 0.25 * end.x, y: 0.25 * start.y + 0.5 * ctrl.y + 0.25 * end.y };
    }
    group.append(s('path', { d, class: 'edge-line', 'marker-end': 'url(#arrow)' }));
    edgeLayer.append(group);
    const lines = pair.flows.map((f) => ({
      flow: f,
      text: `${f.name} · ${rate(f.rate)}${f.errorRate > 0 ? ` · ${(100 * f.errorRate).toFixed(0)}% err` : ''}`,
    }));
    const textWidth = Math.max(...lines.map((l) => l.text.length)) * 6.4 + 10;
    const textHeight = lines.length * 14 + 4;
    const shift = Math.abs(away.x) * (textWidth / 2 + 4) + Math.abs(away.y) * (textHeight / 2 + 4);
    mid = { x: mid.x + away.x * shift, y: mid.y + away.y * shift };
    const top = mid.y - textHeight / 2;
    const label = s('g', { class: 'edge-label', dataset: { test: 'edge-label', from: pair.from, to: pair.to } });
    label.append(s('rect', { x: (mid.x - textWidth / 2).toFixed(1), y: top.toFixed(1), width: textWidth.toFixed(1), height: textHeight, rx: 3 }));
    lines.forEach((l, i) => {
      label.append(s('text', { x: mid.x.toFixed(1), y: (top + 13 + i * 14).toFixed(1), 'text-anchor': 'middle',
        class: l.flow.errorRate > 0 ? 'failing' : '', dataset: { name: l.flow.name }, text: l.text }));
    });
    labelLayer.append(label);
  }
  const nodeLayer = s('g', { class: 'nodes' });
  for (const [name, p] of at) {
    nodeLayer.append(s('g', { class: 'node', dataset: { test: 'node', service: name } },
      s('rect', { x: p.x - NODE_W / 2, y: p.y - NODE_H / 2, width: NODE_W, height: NODE_H, rx: 8 }),
      s('text', { x: p.x, y: p.y + 5, 'text-anchor': 'middle', text: name })));
  }
  svg.append(edgeLayer, nodeLayer, labelLayer);
  return svg;
}

/** Where the line from a node's centre towards `to` leaves its box. */
function border(center, to, w, h) {
  const dx = to.x - center.x;
  const dy = to.y - center.y;
  if (!dx && !dy) return center;
  const scale = Math.min(Math.abs(w / 2 / (dx || 1e-9)), Math.abs(h / 2 / (dy || 1e-9)));
  return { x: center.x + dx * Math.min(1, scale), y: center.y + dy * Math.min(1, scale) };
}
