// The vstream web console: a client of /api/v1, like the CLI.
//
// The token lives in this tab's sessionStorage and goes out as
// `Authorization: Bearer`; every action is the API's own route, so its role
// checks and audit trail apply. Every node is built with the DOM and
// `textContent`: a name holding markup is shown as text, never parsed.
//
//   hash route ──► view.mount(main)          once, builds the static part
//        │
//        └─► tick() every POLL_MS ──► view.load() (GETs) ──► changed? ──► view.render(data)
//
// A tick fetches what the view shows; when the answers are byte for byte
// those of the last tick, nothing is redrawn, so an idle page costs a few
// requests a second and no layout.

const TOKEN_KEY = 'vstream.token';
const POLL_MS = 1000;
const PAGE = 200;
const HOT = 0.8;
const RANK = { metrics: 0, viewer: 1, operator: 2, admin: 3 };

const S = {
  token: sessionStorage.getItem(TOKEN_KEY),
  me: null,
  view: null,
  seen: null,
  texts: [],
  busy: null,
  etags: new Map(),
  lastOk: 0,
  // The farm's servers as last fetched, for the move dialog.
  servers: [],
};
// Timings the browser test reads (performance.now() deltas, in ms).
window.vstreamTimings = {};

// ---- DOM helpers -----------------------------------------------------------

function h(tag, props, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'text') el.textContent = String(v);
    else if (k === 'class') el.className = v;
    else if (k === 'value') el.value = v;
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const kid of kids.flat(Infinity)) {
    if (kid === null || kid === undefined || kid === false) continue;
    el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}
const $ = (id) => document.getElementById(id);
const link = (href, text) => h('a', { href, text });
const vdiskHref = (name) => '#/vdisk/' + encodeURIComponent(name);
const deviceHref = (name) => '#/device/' + encodeURIComponent(name);
const pill = (cls, text) => h('span', { class: 'pill ' + cls, text: text ?? cls });
const can = (role) => S.me && RANK[S.me.role] >= RANK[role];

function table(head, rows, attrs) {
  return h('table', attrs || {},
    h('thead', null, h('tr', null, head.map((c) => h('th', typeof c === 'string' ? { text: c } : c)))),
    h('tbody', null, rows));
}

function flash(msg, error) {
  const f = $('flash');
  f.className = error ? 'error' : '';
  f.textContent = msg;
  clearTimeout(flash.timer);
  flash.timer = setTimeout(() => { f.textContent = ''; }, error ? 15000 : 6000);
}

// ---- formatting ------------------------------------------------------------

function bytes(n) {
  if (n === null || n === undefined) return '—';
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(n)) + ' ' + u[i];
}
function dur(s) {
  if (s === null || s === undefined) return '—';
  if (s < 90) return Math.round(s) + ' s';
  if (s < 5400) return Math.round(s / 60) + ' min';
  if (s < 172800) return (s / 3600).toFixed(1) + ' h';
  return Math.round(s / 86400) + ' d';
}
const when = (ms) => (ms ? new Date(ms).toISOString().replace('T', ' ').slice(0, 19) + 'Z' : '—');
const ago = (unix) => (unix ? dur(Math.max(0, Date.now() / 1000 - unix)) + ' ago' : '—');
const host = (peer) => (peer ? peer.replace(/^\[?([^\]]*?)\]?:\d+$/, '$1') : '—');

// Parses "2GiB", "512M", "4096": the CLI's sizes.
function parseSize(s) {
  const m = /^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?i?b?)\s*$/i.exec(s);
  if (!m) throw new Error(`"${s}" is not a size (e.g. 2GiB)`);
  const unit = m[2].toLowerCase().replace(/i?b$/, '');
  const mult = { '': 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40 }[unit];
  const v = Number(m[1]) * mult;
  if (!Number.isSafeInteger(v)) throw new Error(`"${s}" is not a whole number of bytes`);
  return v;
}

// ---- the API ---------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function call(method, path, body) {
  const headers = { Authorization: 'Bearer ' + S.token };
  const init = { method, headers, cache: 'no-store' };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const r = await fetch(path, init);
  const text = await r.text();
  if (!r.ok) throw failure(r, text, `${method} ${path}`);
  return text;
}

function failure(r, text, what) {
  let msg = text;
  try { msg = JSON.parse(text).error || text; } catch (_) { /* plain text */ }
  return new ApiError(r.status, msg || `${what}: status ${r.status}`);
}

// A GET whose answer counts toward "did anything change" for this tick. It
// names the last answer's ETag: an unchanged answer comes back as a bodiless
// 304, and the last one is used again without parsing.
async function get(path) {
  const known = S.etags.get(path);
  const headers = { Authorization: 'Bearer ' + S.token };
  if (known) headers['If-None-Match'] = known.tag;
  const r = await fetch(path, { headers, cache: 'no-store' });
  let hit = known;
  if (!(r.status === 304 && known)) {
    const text = await r.text();
    if (!r.ok) throw failure(r, text, `GET ${path}`);
    hit = { tag: r.headers.get('ETag'), text, json: text ? JSON.parse(text) : null };
    if (hit.tag) S.etags.set(path, hit);
  }
  S.texts.push(path, hit.tag || hit.text);
  return hit.json;
}

async function act(what, method, path, body) {
  try {
    const text = await call(method, path, body);
    flash(what + ': done.');
    S.seen = null;
    tick();
    return text ? JSON.parse(text) : null;
  } catch (e) {
    flash(`${what}: ${e.message}`, true);
    if (e.status === 401) logout('The token is no longer valid.');
    return undefined;
  }
}

// ---- confirmation dialog ---------------------------------------------------

// Shows what an action will do; `fields` are inputs whose values `run` gets.
// `blocked`: the action cannot be done now (the lines say why); OK is off.
function confirmAction({ title, lines, fields, ok, run, blocked }) {
  const d = $('confirm');
  $('confirm-title').textContent = title;
  const body = $('confirm-body');
  body.replaceChildren(h('ul', null, (lines || []).map((l) => h('li', { text: l }))));
  const inputs = {};
  for (const f of fields || []) {
    let input;
    if (f.options) {
      input = h('select', { name: f.name }, f.options.map((o) => h('option', { value: o, text: o })));
      if (f.value !== undefined) input.value = f.value;
    } else {
      input = h('input', { name: f.name, value: f.value ?? '', placeholder: f.placeholder || '' });
    }
    inputs[f.name] = input;
    body.append(h('p', null, h('label', null, f.label + ' ', input)));
  }
  const okButton = $('confirm-ok');
  okButton.textContent = ok || 'Confirm';
  const fresh = okButton.cloneNode(true);
  fresh.disabled = !!blocked;
  okButton.replaceWith(fresh);
  const cancel = $('confirm-cancel').cloneNode(true);
  $('confirm-cancel').replaceWith(cancel);
  cancel.addEventListener('click', () => d.close());
  fresh.addEventListener('click', async () => {
    const values = {};
    for (const [k, el] of Object.entries(inputs)) values[k] = el.value;
    d.close();
    try {
      await run(values);
    } catch (e) {
      flash(e.message, true);
    }
  });
  d.showModal();
}

// ---- views -----------------------------------------------------------------

const views = {};

views.overview = {
  title: 'Farm',
  async load() {
    const [servers, repl, vdisks] = await Promise.all([
      get('/api/v1/servers'), get('/api/v1/replication'), get('/api/v1/vdisks'),
    ]);
    return { servers, repl, vdisks };
  },
  render({ servers, repl, vdisks }, main) {
    const up = servers.filter((s) => s.up);
    const problems = [];
    for (const s of servers) {
      if (!s.up) problems.push(`server ${s.name} is down (last seen ${ago(s.updated_unix)})`);
      if (s.farm_connected === false) problems.push(`server ${s.name} cannot reach the farm state (etcd): it serves from its last view`);
      for (const st of s.stores || []) if (st.problem) problems.push(`server ${s.name}, store ${st.store} (${st.path}): ${st.problem}`);
      for (const q of s.quarantined || []) problems.push(`server ${s.name} holds vDisk ${q.name} the farm does not list (quarantine)`);
    }
    for (const r of repl) if (r.state === 'corrupt') problems.push(`${r.vdisk} version ${r.version} is corrupt on ${r.server}${r.note ? ': ' + r.note : ''}`);
    for (const v of vdisks) if (v.problem) problems.push(`vDisk ${v.name}: ${v.problem}`);
    const pending = repl.filter((r) => r.state !== 'verified' && r.state !== 'corrupt').length;
    const card = (n, label, bad) => h('div', { class: 'card' + (bad ? ' bad' : '') }, h('div', { class: 'n', text: n }), h('div', { class: 'mute', text: label }));
    const rows = servers.map((s) => {
      const held = s.versions || [];
      return h('tr', { dataset: { server: s.name } },
        h('td', { text: s.name }),
        h('td', null, pill(s.up ? 'up' : 'down')),
        h('td', { class: 'num', text: s.load.toFixed(2) }),
        h('td', { class: 'num', text: s.devices }),
        h('td', { class: 'num', text: s.booting + (s.max_booting ? ' / ' + s.max_booting : '') }),
        h('td', { class: 'num', text: bytes(s.read_bytes_per_s) + '/s' }),
        h('td', { class: 'num', text: `${held.filter((v) => v.verified).length} / ${held.length}` }),
        h('td', { text: s.farm_connected === undefined ? '' : s.farm_connected ? 'connected' : 'AWAY' }),
        h('td', { class: 'mute', text: [s.api_tls || s.api, 'nbd ' + s.nbd + (s.nbd_tls ? ' (TLS ' + s.nbd_tls + ')' : ' (no TLS)'), s.iscsi ? 'iscsi ' + s.iscsi : null].filter(Boolean).join(' · ') }),
        h('td', { class: 'mute', text: ago(s.updated_unix) }));
    });
    main.replaceChildren(
      h('h1', { text: 'Farm' }),
      h('div', { class: 'cards' },
        card(`${up.length} / ${servers.length}`, 'servers up', up.length < servers.length),
        card(servers.reduce((a, s) => a + (s.up ? s.devices : 0), 0), 'devices connected'),
        card(vdisks.length, 'vDisks'),
        card(pending, 'replicas not verified', false),
        card(problems.length, 'problems', problems.length > 0)),
      h('h2', { text: 'Problems' }),
      problems.length ? h('ul', { class: 'problems', id: 'problems' }, problems.map((p) => h('li', { text: p })))
        : h('p', { class: 'mute', id: 'problems', text: 'None.' }),
      h('h2', { text: 'Servers' }),
      table(['server', 'state', { class: 'num', text: 'load' }, { class: 'num', text: 'devices' },
        { class: 'num', text: 'booting' }, { class: 'num', text: 'reads' }, { class: 'num', text: 'verified' },
        'farm state', 'addresses', 'updated'], rows, { id: 'servers' }),
      can('operator') ? h('p', null, h('button', {
        class: 'primary', id: 'rebalance', text: 'Rebalance devices…',
        onclick: () => confirmAction({
          title: 'Rebalance the farm',
          lines: ['Servers above the average load (devices ÷ power) plus 10 % let devices go.',
            'Those devices log in again at a less loaded server that holds their version; their write cache goes with them.'],
          ok: 'Rebalance',
          run: async () => {
            const plan = await act('Rebalance', 'POST', '/api/v1/farm/rebalance', {});
            if (plan) flash('Rebalance: ' + (plan.moves.length ? plan.moves.map((m) => `${m.devices} from ${m.server}`).join(', ') : 'nothing to move'));
          },
        }),
      })) : null);
  },
};

// Versions of every vDisk, with their replicas on every server.
async function loadMatrix(only) {
  const [servers, repl, vdisks] = await Promise.all([
    get('/api/v1/servers'), get('/api/v1/replication'),
    only ? get('/api/v1/vdisks/' + encodeURIComponent(only)).then((v) => [v]) : get('/api/v1/vdisks'),
  ]);
  const versions = await Promise.all(vdisks.map((v) => get(`/api/v1/vdisks/${encodeURIComponent(v.name)}/versions`)));
  S.servers = servers;
  return { servers, repl, vdisks, versions };
}

function matrix({ servers, repl, vdisks, versions }) {
  const cells = new Map(repl.map((r) => [`${r.vdisk}\u0000${r.version}\u0000${r.server}`, r]));
  const names = servers.map((s) => s.name);
  const rows = [];
  vdisks.forEach((v, i) => {
    for (const ver of versions[i]) {
      if (ver.state === 'retired') continue;
      const missingOn = [];
      const tds = names.map((srv) => {
        const r = cells.get(`${v.name}\u0000${ver.number}\u0000${srv}`);
        if (!r) return h('td', { dataset: { cell: `${v.name}/${ver.number}/${srv}`, state: 'none' } }, h('span', { class: 'mute', text: ver.content_hash ? '—' : 'open' }));
        if (r.state !== 'verified') missingOn.push(srv);
        const pct = r.bytes_total ? Math.floor((r.bytes_done / r.bytes_total) * 100) : 0;
        const bits = [r.state];
        if (r.state === 'copying') bits.push(`${pct}%`, r.eta_s !== undefined ? `ETA ${dur(r.eta_s)}` : '', r.rate ? bytes(r.rate) + '/s' : '');
        return h('td', { dataset: { cell: `${v.name}/${ver.number}/${srv}`, state: r.state } },
          h('span', { class: 'cell ' + r.state, title: r.note || '', text: bits.filter(Boolean).join(' ') },
            r.state === 'copying' ? h('div', { class: 'bar' }, h('span', { style: null, dataset: { pct } })) : null),
          r.note && r.state !== 'copying' ? h('div', { class: 'mute', text: r.note }) : null,
          r.boot_set_bytes ? h('div', {
            class: 'mute', dataset: { bootSet: r.boot_set_bytes, uncached: r.boot_set_uncached_bytes || 0, overBudget: r.boot_set_over_budget ? 'yes' : 'no' },
            title: r.boot_set_over_budget
              ? 'Larger than what is left of the server\'s boot-set budget (--boot-set-budget): not read ahead. Clear the set if a device read more than its boot.'
              : 'What devices read while they boot, read ahead of the boot storm and checked every 5 minutes',
            text: 'boot set ' + bootSetText(r),
          }) : null,
          r.up ? null : h('div', { class: 'mute', text: 'server down' }));
      });
      const gate = (ver.state === 'production' || ver.state === 'test') && missingOn.length
        ? h('div', { class: 'mute', text: 'pending: not verified on ' + missingOn.join(', ') }) : null;
      rows.push(h('tr', { dataset: { version: `${v.name}/${ver.number}` } },
        h('td', null, link(vdiskHref(v.name), v.name)),
        h('td', { class: 'num', text: ver.number }),
        h('td', null, pill(ver.state), gate),
        h('td', { text: ver.devices.length ? ver.devices.length + ': ' + ver.devices.slice(0, 5).join(', ') + (ver.devices.length > 5 ? ' …' : '') : '—' }),
        tds));
    }
  });
  const t = table(['vDisk', { class: 'num', text: 'version' }, 'state', 'devices on it', ...names], rows, { id: 'matrix' });
  // Bar widths through the CSSOM: the policy forbids inline style attributes.
  for (const bar of t.querySelectorAll('.bar > span')) bar.style.width = bar.dataset.pct + '%';
  return t;
}

views.replication = {
  title: 'Replication',
  load: () => loadMatrix(null),
  render(data, main) {
    main.replaceChildren(h('h1', { text: 'Replication: vDisks × versions × servers' }),
      h('p', { class: 'mute', text: 'Each cell is one server\'s copy of one version: missing, queued, copying (with % and ETA), verified by content hash, or corrupt; and for a version devices boot, the boot set the server reads ahead of them and whether it is all in memory.' }),
      matrix(data),
      can('operator') ? h('p', null, h('button', {
        class: 'primary', id: 'replicate-all', text: 'Copy everything now…',
        onclick: () => confirmAction({
          title: 'Replicate now', ok: 'Start',
          lines: ['Every server copies every version it lacks now, outside its time windows (for one hour), at its rate limit.'],
          run: () => act('Replication start', 'POST', '/api/v1/replication/start', {}),
        }),
      })) : null);
  },
};

views.vdisks = {
  title: 'vDisks',
  load: async () => ({ vdisks: await get('/api/v1/vdisks') }),
  render({ vdisks }, main) {
    const rows = vdisks.map((v) => h('tr', { dataset: { vdisk: v.name } },
      h('td', null, link(vdiskHref(v.name), v.name)),
      h('td', { class: 'num', text: bytes(v.size) }),
      h('td', { text: v.mode }), h('td', { text: v.cache_type }),
      h('td', { class: 'num', text: v.cache_limit ? bytes(v.cache_limit) : '—' }),
      h('td', { text: v.store || 'default' }),
      h('td', { class: 'num', text: v.connected.length }),
      h('td', { class: 'mute', text: (v.content_hash || '').slice(0, 12) }),
      h('td', { class: 'problems', text: v.problem || (v.not_here ? 'not on this server' : '') })));
    main.replaceChildren(h('h1', { text: 'vDisks' }),
      table(['name', { class: 'num', text: 'size' }, 'mode', 'cache', { class: 'num', text: 'cache limit' }, 'store',
        { class: 'num', text: 'connected' }, 'content', 'problem'], rows, { id: 'vdisks' }),
      can('admin') ? h('p', null, h('button', {
        class: 'primary', id: 'vdisk-create', text: 'New empty vDisk…',
        onclick: () => confirmAction({
          title: 'Create a vDisk', ok: 'Create',
          lines: ['An empty vDisk (version 1, private mode) in the store named; import content with the CLI (vstream vdisk import).'],
          fields: [{ name: 'name', label: 'Name' }, { name: 'size', label: 'Size', placeholder: '8GiB' },
            { name: 'store', label: 'Store', value: 'default' }],
          run: (f) => act(`Create vDisk ${f.name}`, 'POST', '/api/v1/vdisks', { name: f.name, size: parseSize(f.size), store: f.store || undefined }),
        }),
      })) : null);
  },
};

// A server's boot set of a version (a replication row, or a version of this
// server): its size, and whether it was cached at the last check or over budget.
function bootSetText(r) {
  if (!r.boot_set_bytes) return '';
  return bytes(r.boot_set_bytes) + (r.boot_set_over_budget ? ', over budget: not read ahead'
    : r.boot_set_uncached_bytes ? ', ' + bytes(r.boot_set_uncached_bytes) + ' not cached' : ' cached');
}

function deviceList(devices) {
  return devices.map((d) => d.name).join(', ') || 'none';
}

views.vdisk = {
  title: 'vDisk',
  async load(name) {
    const [m, devices] = await Promise.all([loadMatrix(name), get('/api/v1/devices')]);
    return { ...m, devices: devices.filter((d) => d.vdisk === name) };
  },
  render(data, main) {
    const v = data.vdisks[0];
    const versions = data.versions[0];
    const enc = encodeURIComponent(v.name);
    const live = versions.filter((x) => x.state !== 'retired');
    const prod = live.filter((x) => x.state === 'production').pop();
    const byType = (t) => data.devices.filter((d) => d.type === t);
    const admin = can('admin');
    const boot = v.boot || {};
    const versionRows = live.map((ver) => {
      const actions = [];
      if (admin) {
        const promote = (to, lines) => actions.push(h('button', {
          text: 'Promote to ' + to, dataset: { action: `promote-${to}`, version: ver.number },
          onclick: () => confirmAction({
            title: `Promote ${v.name} version ${ver.number} to ${to}`, ok: 'Promote', lines,
            run: () => act(`Promote ${v.name} v${ver.number} to ${to}`, 'POST', `/api/v1/vdisks/${enc}/versions/${ver.number}/promote`, { to }),
          }),
        }));
        if (ver.state === 'maintenance') {
          promote('test', [`Version ${ver.number} is sealed (no more writes) and becomes the test version.`,
            `Test devices boot it at their next boot: ${deviceList(byType('test'))}.`,
            `Production devices stay on version ${prod ? prod.number : '—'}.`,
            'Every server copies it and checks its content hash.']);
        }
        if (ver.state === 'maintenance' || ver.state === 'test') {
          promote('production', [`Version ${ver.number} becomes the production version of ${v.name}.`,
            `Every production device (${byType('production').length}) boots it at its next boot; running ones keep their version until then.`,
            prod ? `Version ${prod.number} stays as the version to roll back to.` : 'There is no production version yet.',
            'Servers that have not verified it yet copy it first; devices there wait or boot elsewhere.']);
        }
        if (ver.state === 'test' || ver.state === 'production') {
          actions.push(h('button', {
            text: 'Clear boot set', dataset: { action: 'clear-boot-set', version: ver.number },
            onclick: () => confirmAction({
              title: `Clear the boot set of ${v.name} version ${ver.number}`, ok: 'Clear',
              lines: ['What devices read while they boot this version, learned on each server and read ahead of the boot storm, is forgotten on every server (one down now too, when it is back).',
                'The next boots learn it again; until then a server that restarts reads their first blocks from its disk.',
                'Use it when a device read more than its boot in its first minutes (a disk scan), or a set is over a server\'s budget.',
                ver.boot_set_cleared_unix ? `Last cleared ${when(ver.boot_set_cleared_unix * 1000)}.` : 'Never cleared before.'],
              run: () => act(`Clear the boot set of ${v.name} v${ver.number}`, 'DELETE', `/api/v1/vdisks/${enc}/versions/${ver.number}/boot-set`),
            }),
          }));
        }
        actions.push(h('button', {
          class: 'danger', text: 'Delete', dataset: { action: 'delete', version: ver.number },
          onclick: () => confirmAction({
            title: `Delete ${v.name} version ${ver.number}`, ok: 'Delete',
            lines: [`Version ${ver.number} (${ver.state}) and its own layer (${bytes(ver.own_bytes)}) are deleted on every server.`,
              ver.devices.length ? `Refused: devices use it now (${ver.devices.join(', ')}).` : 'No device uses it now.'],
            run: () => act(`Delete ${v.name} v${ver.number}`, 'DELETE', `/api/v1/vdisks/${enc}/versions/${ver.number}`),
          }),
        }));
      }
      return h('tr', { dataset: { version: ver.number } },
        h('td', { class: 'num', text: ver.number }), h('td', null, pill(ver.state)),
        h('td', { text: when(ver.created_unix * 1000) }),
        h('td', { text: ver.sealed_unix ? when(ver.sealed_unix * 1000) : 'open for writing' }),
        h('td', { class: 'num', text: bytes(ver.own_bytes) }), h('td', { class: 'num', text: ver.layers }),
        h('td', { class: 'mute', text: (ver.content_hash || '').slice(0, 12) }),
        h('td', { text: ver.devices.join(', ') || '—' }),
        h('td', { class: 'mute', text: bootSetText(ver) || '—', dataset: { bootSet: ver.boot_set_bytes || 0 },
          title: 'This server\'s boot set of the version: what its devices read while they boot, read ahead of the boot storm' }),
        h('td', { class: 'actions' }, actions));
    });
    const top = live[live.length - 1];
    const header = admin ? h('p', { class: 'actions' },
      h('button', {
        class: 'primary', id: 'version-new', text: 'New version…',
        onclick: () => confirmAction({
          title: `New version of ${v.name}`, ok: 'Create',
          lines: [`Version ${top ? top.number + 1 : 1} is made on top of version ${top ? top.number : '—'}, in maintenance: only maintenance devices boot it, and write to it.`,
            `Maintenance devices: ${deviceList(byType('maintenance'))}.`, 'Test and production devices are not affected.'],
          run: () => act(`New version of ${v.name}`, 'POST', `/api/v1/vdisks/${enc}/versions`),
        }),
      }),
      h('button', {
        id: 'version-rollback', text: 'Roll back…',
        onclick: () => confirmAction({
          title: `Roll back ${v.name}`, ok: 'Roll back',
          lines: [`Production version ${prod ? prod.number : '—'} is retired; the production version before it serves again.`,
            `Production devices (${byType('production').length}) boot that version at their next boot.`],
          run: () => act(`Roll back ${v.name}`, 'POST', `/api/v1/vdisks/${enc}/rollback`),
        }),
      }),
      h('button', {
        id: 'version-merge', text: 'Merge…',
        onclick: () => confirmAction({
          title: `Merge ${v.name}`, ok: 'Merge',
          lines: [`The layers up to the production version (${live.length} versions now) become one layer with the same content hash.`,
            'The older versions go; refused while a device runs one of them, or a maintenance version is open.',
            'Every server merges its own copy and checks the hash.'],
          run: () => act(`Merge ${v.name}`, 'POST', `/api/v1/vdisks/${enc}/merge`, {}),
        }),
      }),
      h('button', {
        id: 'vdisk-settings', text: 'Settings…',
        onclick: () => confirmAction({
          title: `Settings of ${v.name}`, ok: 'Save',
          lines: ['Mode standard: devices boot a shared read-only image with a write cache each; private: one writer.',
            'Physical sector 4096 (512e): Windows aligns to 4 KiB, a layer\'s chunk.',
            'Mode, cache and sectors cannot change while devices are connected; the boot method can. Changes apply to devices at their next boot.'],
          fields: [{ name: 'mode', label: 'Mode', options: ['private', 'standard'], value: v.mode },
            { name: 'cache_type', label: 'Cache type', options: ['server', 'device'], value: v.cache_type },
            { name: 'cache_limit', label: 'Cache limit', value: v.cache_limit ? bytes(v.cache_limit).replace(' ', '').replace('.0', '') : '', placeholder: 'none, or e.g. 2GiB' },
            { name: 'physical_sector', label: 'Physical sector', options: ['512', '4096'], value: String(v.physical_sector || 512) },
            { name: 'boot', label: 'Boot method', options: ['kernel', 'sanboot'], value: boot.method || 'kernel' }],
          run: (f) => {
            // Only what changed: a boot method may change under connected devices.
            const limit = f.cache_limit.trim() ? parseSize(f.cache_limit) : null;
            const body = {};
            if (f.mode !== v.mode) body.mode = f.mode;
            if (f.cache_type !== v.cache_type) body.cache_type = f.cache_type;
            if (limit !== null && limit !== v.cache_limit) body.cache_limit = limit;
            if (Number(f.physical_sector) !== (v.physical_sector || 512)) body.physical_sector = Number(f.physical_sector);
            if (f.boot !== (boot.method || 'kernel')) body.boot = f.boot;
            if (!Object.keys(body).length) return flash(`Settings of ${v.name}: nothing changed.`);
            return act(`Settings of ${v.name}`, 'PATCH', `/api/v1/vdisks/${enc}`, body);
          },
        }),
      }),
      h('button', {
        id: 'vdisk-cmdline', text: 'Boot command line…',
        onclick: () => confirmAction({
          title: `Kernel command line of ${v.name}`, ok: 'Save',
          lines: ['Devices that boot its kernel get this command line (plus the farm\'s own arguments) at their next boot.'],
          fields: [{ name: 'cmdline', label: 'Command line', value: boot.cmdline || '' }],
          run: (f) => act(`Command line of ${v.name}`, 'PUT', `/api/v1/vdisks/${enc}/boot/cmdline`, { cmdline: f.cmdline }),
        }),
      }),
      h('button', {
        class: 'danger', id: 'vdisk-delete', text: 'Delete vDisk…',
        onclick: () => confirmAction({
          title: `Delete vDisk ${v.name}`, ok: 'Delete',
          lines: [`${v.name} and all its versions are deleted on every server (${bytes(v.allocated)} here).`,
            data.devices.length ? `Refused while devices are assigned to it: ${deviceList(data.devices)}.` : 'No device is assigned to it.'],
          run: async () => { if (await act(`Delete ${v.name}`, 'DELETE', `/api/v1/vdisks/${enc}`) !== undefined) location.hash = '#/vdisks'; },
        }),
      })) : null;
    main.replaceChildren(
      h('h1', null, 'vDisk ', h('span', { id: 'vdisk-name', text: v.name })),
      h('dl', { class: 'kv' }, [
        ['size', bytes(v.size)], ['mode', v.mode], ['cache type', v.cache_type],
        ['cache limit', v.cache_limit ? bytes(v.cache_limit) : 'none'], ['store', v.store || 'default'],
        ['sectors', (v.physical_sector || 512) === 512 ? '512 bytes (512n)' : `512 bytes logical, ${v.physical_sector} physical (512e)`],
        ['allocated here', bytes(v.allocated)], ['content hash', v.content_hash],
        ['boot', `${boot.method || 'kernel'}${boot.kernel ? ', kernel ' + bytes(boot.kernel.size) : ''}${boot.initrd ? ', initrd ' + bytes(boot.initrd.size) : ''}`],
        ['command line', boot.cmdline || '—'], ['problem', v.problem || 'none'],
      ].map(([k, val]) => [h('dt', { text: k }), h('dd', { text: val ?? '—', dataset: { key: k } })])),
      header,
      h('h2', { text: 'Versions' }),
      table([{ class: 'num', text: '#' }, 'state', 'created', 'sealed', { class: 'num', text: 'own bytes' },
        { class: 'num', text: 'layers' }, 'content', 'devices on it', 'boot set here', ''], versionRows, { id: 'versions' }),
      h('h2', { text: 'Replication' }),
      matrix(data),
      h('h2', { text: `Devices assigned (${data.devices.length})` }),
      deviceTable(data.devices.slice(0, PAGE), new Map([[v.name, v.cache_limit]])));
  },
};

// ---- devices ---------------------------------------------------------------

function fillOf(d, limits) {
  const limit = limits.get(d.vdisk);
  return limit ? d.cache_bytes / limit : null;
}

function deviceActions(d) {
  if (!can('operator')) return [];
  const enc = encodeURIComponent(d.name);
  return [
    h('button', {
      text: 'Reset', dataset: { action: 'reset' },
      onclick: () => confirmAction({
        title: `Reset ${d.name}`, ok: 'Reset',
        lines: [`The write cache of ${d.name} (${bytes(d.cache_bytes)}) is thrown away: it boots clean from its vDisk next time.`,
          d.connected ? `It is connected to ${d.server}: with "disconnect first" it is cut off now; without, the reset is refused while it runs.` : 'It is not connected.'],
        fields: d.connected ? [{ name: 'force', label: 'Disconnect first', options: ['no', 'yes'] }] : [],
        run: (f) => act(`Reset ${d.name}`, 'POST', `/api/v1/devices/${enc}/reset${f.force === 'yes' ? '?force=true' : ''}`),
      }),
    }),
    d.connected ? h('button', {
      text: 'Move…', dataset: { action: 'move' },
      onclick: () => confirmMove(d),
    }) : null,
    h('button', {
      text: 'Type…', dataset: { action: 'set-type' },
      onclick: () => confirmAction({
        title: `Type of ${d.name}`, ok: 'Set',
        lines: ['Maintenance devices boot the open maintenance version and write to it; test devices the test version; production devices the production version.',
          'The new type counts at its next boot.'],
        fields: [{ name: 'type', label: 'Type', options: ['production', 'test', 'maintenance'], value: d.type }],
        run: (f) => act(`Type of ${d.name}`, 'PATCH', `/api/v1/devices/${enc}`, { type: f.type }),
      }),
    }),
    h('button', {
      class: 'danger', text: 'Remove', dataset: { action: 'remove' },
      onclick: () => confirmAction({
        title: `Remove ${d.name}`, ok: 'Remove',
        lines: [`${d.name} (${d.mac}) leaves the farm with its write cache; it cannot log in any more.`,
          d.connected ? `Refused while it is connected (to ${d.server}).` : 'It is not connected.'],
        run: () => act(`Remove ${d.name}`, 'DELETE', `/api/v1/devices/${enc}`),
      }),
    }),
  ];
}

// A count of the device's events since it was added, with when the last
// one was as the cell's title; non-zero counts stand out.
function countCell(n, lastMs, key) {
  return h('td', { class: 'num count' + (n ? ' warn' : ''), dataset: { [key]: n || 0 }, title: lastMs ? 'last ' + when(lastMs) : null, text: n || 0 });
}

// The servers that are up, other than the device's, and hold a verified
// copy of the version it runs (the content its server holds): where it may
// move.
function moveTargets(d) {
  const has = (s, hash) => (s.versions || []).some((v) => v.vdisk === d.vdisk && v.number === d.version
    && v.verified && !v.writable && (!hash || v.content_hash === hash));
  const cur = S.servers.find((s) => s.name === d.server);
  const mine = cur && (cur.versions || []).find((v) => v.vdisk === d.vdisk && v.number === d.version);
  const hash = mine ? mine.content_hash : '';
  return S.servers.filter((s) => s.up && s.name !== d.server && has(s, hash));
}

function confirmMove(d) {
  const targets = moveTargets(d);
  const lines = [`${d.name} streams vDisk ${d.vdisk} version ${d.version} from ${d.server}.`];
  let blocked = false;
  if (!d.device_cache) {
    blocked = true;
    lines.push(`Its writes go to ${d.server} (a Private-mode vDisk, a maintenance version, or a write cache on the server): it stays there while it runs.`);
  } else if (!targets.length) {
    blocked = true;
    lines.push(`No other server that is up holds a verified copy of ${d.vdisk} version ${d.version}: it cannot move now.`);
  } else {
    lines.push('Servers up with a verified copy of that version: '
      + targets.map((s) => `${s.name} (load ${s.load.toFixed(2)}, ${s.devices} devices)`).join(', ') + '.',
    `${d.server} lets it go; its agent logs in again at the server chosen within seconds. Its write cache stays on the device; reads pause meanwhile.`);
  }
  confirmAction({
    title: `Move ${d.name}`, ok: 'Move', lines, blocked,
    fields: targets.length && !blocked ? [{ name: 'server', label: 'To server', options: targets.map((s) => s.name) }] : [],
    run: (f) => act(`Move ${d.name} to ${f.server}`, 'POST', `/api/v1/devices/${encodeURIComponent(d.name)}/move`, { server: f.server }),
  });
}

// Where a device was moved a moment ago and is not yet: "moving to s2".
function moving(d) {
  const m = d.moved;
  return m && m.server !== d.server && Date.now() / 1000 - m.requested_unix < 120 ? 'moving to ' + m.server : null;
}

function deviceRow(d, fill) {
  const hot = fill !== null && fill > HOT;
  const pct = fill === null ? null : Math.round(fill * 1000) / 10;
  return h('tr', { class: hot ? 'hot' : null, dataset: { device: d.name, state: d.connected ? 'connected' : 'offline' } },
    h('td', null, link(deviceHref(d.name), d.name), h('div', { class: 'mute', text: d.mac })),
    h('td', { class: 'server', text: d.server || '—' }),
    h('td', null, link(vdiskHref(d.vdisk), d.vdisk)),
    h('td', { class: 'num', text: d.version ?? '—' }),
    h('td', null, pill(d.type)),
    h('td', null, d.connected ? pill('up', 'connected') : pill('missing', 'offline'),
      d.connected_since ? h('div', { class: 'mute', text: 'since ' + ago(d.connected_since) }) : null,
      moving(d) ? h('div', { class: 'mute', text: moving(d) }) : null),
    h('td', { text: host(d.peer) }),
    h('td', { class: 'num fill', dataset: { fill: pct ?? '' }, text: (pct === null ? '' : pct + ' % · ') + bytes(d.cache_bytes) }),
    countCell(d.retries, d.last_retry_ms, 'retries'),
    countCell(d.failovers, d.last_failover_ms, 'failovers'),
    h('td', { class: 'actions' }, deviceActions(d)));
}

// The devices table's columns: [heading, sort key or null, numeric].
const DEVICE_COLUMNS = [['device', 'name'], ['server', 'server'], ['vDisk', 'vdisk'], ['version', null, true],
  ['type', null], ['state', null], ['IP', null], ['cache fill', 'fill', true], ['retries', 'retries', true],
  ['failovers', 'failovers', true], ['', null]];

function deviceTable(devices, limits) {
  return table(DEVICE_COLUMNS.map(([text, , num]) => (num ? { class: 'num', text } : text)),
    devices.map((d) => deviceRow(d, fillOf(d, limits))));
}

// How the devices page orders its rows: by name, or the column picked
// (counts and fill largest first), then by name.
const DEVICE_SORTS = {
  name: null,
  server: (x) => x.d.server || '\uffff',
  vdisk: (x) => x.d.vdisk,
  fill: (x) => -(x.fill ?? -1),
  retries: (x) => -(x.d.retries || 0),
  failovers: (x) => -(x.d.failovers || 0),
};

function afterPaint(t0, key) {
  requestAnimationFrame(() => requestAnimationFrame(() => {
    window.vstreamTimings[key] = performance.now() - t0;
    $('main').dataset[key] = String(window.vstreamTimings[key].toFixed(1));
  }));
}

views.devices = {
  title: 'Devices',
  mount(main) {
    const t0 = performance.now();
    const f = this.f = { q: '', server: '', vdisk: '', type: '', state: '', sort: 'name', page: 0 };
    const onChange = (key) => (ev) => {
      const t = performance.now();
      f[key] = ev.target.value;
      f.page = 0;
      this.apply();
      afterPaint(t, 'filterMs');
    };
    this.first = t0;
    this.sel = {
      server: h('select', { id: 'f-server', onchange: onChange('server') }),
      vdisk: h('select', { id: 'f-vdisk', onchange: onChange('vdisk') }),
    };
    this.count = h('span', { id: 'count', class: 'mute' });
    this.body = h('tbody');
    this.pager = h('div', { class: 'pager' });
    main.replaceChildren(h('h1', { text: 'Devices' }),
      h('div', { class: 'filters' },
        h('input', { id: 'f-q', type: 'search', placeholder: 'name, MAC or IP', oninput: onChange('q') }),
        this.sel.server, this.sel.vdisk,
        h('select', { id: 'f-type', onchange: onChange('type') }, ['', 'production', 'test', 'maintenance'].map((o) => h('option', { value: o, text: o || 'any type' }))),
        h('select', { id: 'f-state', onchange: onChange('state') }, [['', 'any state'], ['connected', 'connected'], ['offline', 'offline'], ['hot', 'cache over 80 %'],
          ['unsteady', 'with retries or failovers']].map(([v, t]) => h('option', { value: v, text: t }))),
        h('select', { id: 'f-sort', onchange: onChange('sort') }, Object.keys(DEVICE_SORTS).map((k) => h('option', { value: k, text: 'by ' + (k === 'vdisk' ? 'vDisk' : k === 'fill' ? 'cache fill' : k) }))),
        this.count),
      h('table', { id: 'devices' },
        h('thead', null, h('tr', null, DEVICE_COLUMNS.map(([c, key, num]) => h('th', {
          text: c, class: num ? 'num' : null, dataset: key ? { sort: key } : null, title: key ? 'sort by ' + c : null,
          onclick: key ? () => { const sel = $('f-sort'); sel.value = key; sel.dispatchEvent(new Event('change')); } : null,
        })))),
        this.body),
      this.pager);
  },
  async load() {
    const t = performance.now();
    const [devices, vdisks, servers] = await Promise.all([get('/api/v1/devices'), get('/api/v1/vdisks'), get('/api/v1/servers')]);
    S.servers = servers;
    window.vstreamTimings.devicesLoadMs = performance.now() - t;
    return { devices, vdisks, servers };
  },
  render({ devices, vdisks, servers }) {
    const t = performance.now();
    const limits = new Map(vdisks.map((v) => [v.name, v.cache_limit]));
    this.all = devices
      .map((d) => {
        const fill = fillOf(d, limits);
        return { d, fill, hay: `${d.name}\n${d.mac}\n${host(d.peer)}`.toLowerCase() };
      })
      .sort((a, b) => (a.d.name < b.d.name ? -1 : a.d.name > b.d.name ? 1 : 0));
    this.options(this.sel.server, 'any server', servers.map((s) => s.name));
    this.options(this.sel.vdisk, 'any vDisk', vdisks.map((v) => v.name));
    this.apply();
    window.vstreamTimings.devicesRenderMs = performance.now() - t;
    if (this.first !== null) {
      afterPaint(this.first, 'firstPaintMs');
      this.first = null;
    }
  },
  options(select, any, names) {
    const want = ['', ...names];
    const have = [...select.options].map((o) => o.value);
    if (want.join('\u0000') === have.join('\u0000')) return;
    const cur = select.value;
    select.replaceChildren(...want.map((n) => h('option', { value: n, text: n || any })));
    select.value = want.includes(cur) ? cur : '';
  },
  apply() {
    if (!this.all) return;
    const f = this.f;
    const q = f.q.trim().toLowerCase();
    let shown = this.all.filter((x) => (!q || x.hay.includes(q))
      && (!f.server || x.d.server === f.server)
      && (!f.vdisk || x.d.vdisk === f.vdisk)
      && (!f.type || x.d.type === f.type)
      && (!f.state || (f.state === 'hot' ? x.fill !== null && x.fill > HOT
        : f.state === 'unsteady' ? x.d.retries > 0 || x.d.failovers > 0
          : (f.state === 'connected') === x.d.connected)));
    const by = DEVICE_SORTS[f.sort];
    if (by) {
      // Stable: ties keep the order by name.
      const keyed = shown.map((x) => [by(x), x]);
      keyed.sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
      shown = keyed.map((k) => k[1]);
    }
    const pages = Math.max(1, Math.ceil(shown.length / PAGE));
    f.page = Math.min(f.page, pages - 1);
    const slice = shown.slice(f.page * PAGE, (f.page + 1) * PAGE);
    const frag = document.createDocumentFragment();
    for (const x of slice) frag.append(deviceRow(x.d, x.fill));
    this.body.replaceChildren(frag);
    const hot = this.all.filter((x) => x.fill !== null && x.fill > HOT).length;
    const connected = this.all.filter((x) => x.d.connected).length;
    this.count.textContent = `${shown.length} of ${this.all.length} devices · ${connected} connected · ${hot} with the cache over 80 %`;
    this.count.dataset.shown = shown.length;
    const go = (p) => () => { f.page = p; this.apply(); };
    this.pager.replaceChildren(
      h('button', { text: '‹ previous', disabled: f.page === 0, onclick: go(f.page - 1) }),
      h('span', { text: `page ${f.page + 1} of ${pages}` }),
      h('button', { text: 'next ›', disabled: f.page >= pages - 1, onclick: go(f.page + 1) }));
  },
};

views.device = {
  title: 'Device',
  async load(name) {
    const enc = encodeURIComponent(name);
    const [d, events, servers] = await Promise.all([get('/api/v1/devices/' + enc), get(`/api/v1/devices/${enc}/events`), get('/api/v1/servers')]);
    S.servers = servers;
    const v = await get('/api/v1/vdisks/' + encodeURIComponent(d.vdisk)).catch(() => null);
    return { d, events, v };
  },
  render({ d, events, v }, main) {
    const fill = v && v.cache_limit ? d.cache_bytes / v.cache_limit : null;
    const count = (k) => events.filter((e) => e.kind === k).length;
    main.replaceChildren(
      h('h1', null, 'Device ', h('span', { id: 'device-name', text: d.name })),
      h('dl', { class: 'kv' }, [
        ['MAC', d.mac], ['vDisk', d.vdisk], ['type', d.type], ['state', d.connected ? 'connected' : 'offline'],
        ['server', (d.server || '—') + (moving(d) ? ` (${moving(d)})` : '')], ['version', d.version ?? '—'], ['since', d.connected_since ? `${when(d.connected_since * 1000)} (${ago(d.connected_since)})` : '—'],
        ['IP', host(d.peer)], ['protocol', d.protocol || (d.connected ? 'nbd' : '—')],
        ['write cache', `${bytes(d.cache_bytes)}${fill !== null ? ` (${(fill * 100).toFixed(1)} % of ${bytes(v.cache_limit)})` : ''}${d.device_cache ? ', on the device' : ''}`],
        ['retries', `${d.retries || 0}${d.last_retry_ms ? ', last ' + when(d.last_retry_ms) : ''}`],
        ['failovers', `${d.failovers || 0}${d.last_failover_ms ? ', last ' + when(d.last_failover_ms) : ''}`],
        ['refusals (recent)', count('refusal')], ['cache warnings (recent)', count('cache_full')],
        ['iSCSI initiator', d.iscsi_initiator || '—'],
        ['last move', d.moved ? `from ${d.moved.from} to ${d.moved.server} at ${when(d.moved.requested_unix * 1000)}` : '—'],
      ].map(([k, val]) => [h('dt', { text: k }), h('dd', { text: String(val), dataset: { key: k } })])),
      h('p', { class: 'actions' }, deviceActions(d)),
      h('h2', { text: 'Recent events' }),
      table(['when', 'event', 'server', 'detail'], events.slice().reverse().map((e) => h('tr', null,
        h('td', { text: when(e.at_ms) }), h('td', null, pill(e.kind === 'connect' ? 'up' : e.kind === 'disconnect' ? 'missing' : e.kind === 'move' ? 'maintenance' : 'corrupt', e.kind)),
        h('td', { text: e.server }), h('td', { text: e.detail || '' }))), { id: 'events' }));
  },
};

views.stores = {
  title: 'Stores',
  load: async () => ({ stores: await get('/api/v1/stores') }),
  render({ stores }, main) {
    main.replaceChildren(h('h1', { text: 'Stores' }),
      stores.map((s) => h('section', { dataset: { store: s.name } },
        h('h2', { text: `${s.name} — ${s.path}` }),
        h('p', { class: 'mute', text: 'vDisks: ' + (s.vdisks.join(', ') || 'none') }),
        table(['server', 'folder', 'problem'], s.servers.map((x) => h('tr', null,
          h('td', { text: x.server }), h('td', { text: x.path }), h('td', { class: 'problems', text: x.problem || 'ok' })))),
        can('admin') && s.name !== 'default' ? h('p', null, h('button', {
          class: 'danger', text: 'Remove store…',
          onclick: () => confirmAction({
            title: `Remove store ${s.name}`, ok: 'Remove',
            lines: ['The farm forgets the store; its folders stay on the servers.',
              s.vdisks.length ? `Refused: it holds ${s.vdisks.join(', ')}.` : 'It holds no vDisk.'],
            run: () => act(`Remove store ${s.name}`, 'DELETE', '/api/v1/stores/' + encodeURIComponent(s.name)),
          }),
        })) : null)),
      can('admin') ? h('p', null, h('button', {
        class: 'primary', text: 'Add store…',
        onclick: () => confirmAction({
          title: 'Add a store', ok: 'Add',
          lines: ['A named store: a folder, new or empty, on every server (a server may keep it elsewhere with --store-path).'],
          fields: [{ name: 'name', label: 'Name' }, { name: 'path', label: 'Path' }],
          run: (f) => act(`Add store ${f.name}`, 'POST', '/api/v1/stores', { name: f.name, path: f.path }),
        }),
      })) : null);
  },
};

views.audit = {
  title: 'Audit trail',
  mount(main) {
    this.q = '';
    this.body = h('tbody');
    main.replaceChildren(h('h1', { text: 'Audit trail' }),
      h('p', { class: 'mute', text: 'Every change and every refusal, from the API, the CLI and this console, at any server of the farm; newest first (the latest 1,000).' }),
      h('div', { class: 'filters' }, h('input', {
        id: 'audit-q', type: 'search', placeholder: 'object, who, route or result',
        oninput: (ev) => { this.q = ev.target.value.toLowerCase(); this.apply(); },
      })),
      h('table', { id: 'audit' }, h('thead', null, h('tr', null,
        ['when', 'who', 'role', 'from', 'server', 'request', 'object', 'summary', 'status', 'result'].map((c) => h('th', { text: c })))), this.body));
  },
  load: async () => ({ entries: await get('/api/v1/audit?limit=1000') }),
  render({ entries }) {
    this.entries = entries.slice().reverse();
    this.apply();
  },
  apply() {
    const q = this.q;
    const rows = (this.entries || []).filter((e) => !q || `${e.object}\n${e.who}\n${e.path}\n${e.result}\n${e.summary || ''}`.toLowerCase().includes(q))
      .map((e) => h('tr', { dataset: { object: e.object, method: e.method, status: e.status } },
        h('td', { text: when(e.at_ms) }), h('td', { text: e.who }), h('td', { text: e.role || '—' }),
        h('td', { text: e.from }), h('td', { text: e.server }), h('td', { text: `${e.method} ${e.path}` }),
        h('td', { text: e.object }), h('td', { class: 'mute', text: e.summary || '' }),
        h('td', { class: 'num', text: e.status }), h('td', { class: e.status >= 400 ? 'problems' : '', text: e.result })));
    this.body.replaceChildren(...rows);
  },
};

views.tokens = {
  title: 'Tokens',
  role: 'admin',
  load: async () => ({ tokens: await get('/api/v1/tokens') }),
  render({ tokens }, main) {
    main.replaceChildren(h('h1', { text: 'API tokens' }),
      h('p', { class: 'mute', text: 'Tokens are stored hashed in the farm state; a new token is shown once.' }),
      h('div', { id: 'new-token' }),
      table(['name', 'role', 'created', 'expires', 'created by', ''], tokens.map((t) => h('tr', { dataset: { token: t.name } },
        h('td', { text: t.name }), h('td', null, pill(t.role === 'admin' ? 'corrupt' : t.role === 'operator' ? 'test' : 'missing', t.role)),
        h('td', { text: when(t.created_unix * 1000) }), h('td', { text: t.expires_unix ? when(t.expires_unix * 1000) : 'never' }),
        h('td', { text: t.created_by }),
        h('td', null, h('button', {
          class: 'danger', text: 'Revoke…',
          onclick: () => confirmAction({
            title: `Revoke token ${t.name}`, ok: 'Revoke',
            lines: [`Token ${t.name} (${t.role}) opens nothing from a second from now, at every server.`],
            run: () => act(`Revoke ${t.name}`, 'DELETE', '/api/v1/tokens/' + encodeURIComponent(t.name)),
          }),
        }))))),
      h('p', null, h('button', {
        class: 'primary', text: 'New token…',
        onclick: () => confirmAction({
          title: 'Create a token', ok: 'Create',
          lines: ['admin: everything; operator: device actions, rebalance, replication; viewer: read only; metrics: /metrics only.'],
          fields: [{ name: 'name', label: 'Name' }, { name: 'role', label: 'Role', options: ['viewer', 'operator', 'admin', 'metrics'] },
            { name: 'hours', label: 'Expires after (hours, empty: never)' }],
          run: async (f) => {
            const hours = f.hours.trim() ? Number(f.hours) : null;
            if (hours !== null && !(hours > 0)) throw new Error('the expiry is a number of hours');
            const t = await act(`Create token ${f.name}`, 'POST', '/api/v1/tokens', { name: f.name, role: f.role, expires_secs: hours ? Math.round(hours * 3600) : undefined });
            if (t) $('new-token').replaceChildren(h('p', null, `Token ${t.name} (shown once, copy it now): `), h('div', { class: 'token-once', text: t.token }));
          },
        }),
      })));
  },
};

// ---- routing, login and the poll loop --------------------------------------

const NAV = [['overview', 'Farm'], ['replication', 'Replication'], ['vdisks', 'vDisks'], ['devices', 'Devices'],
  ['stores', 'Stores'], ['audit', 'Audit trail'], ['tokens', 'Tokens']];

function route() {
  const [, name, arg] = /^#\/([a-z]+)(?:\/(.*))?$/.exec(location.hash) || [];
  const view = views[name] ? name : 'overview';
  return { name: view, view: views[view], arg: arg === undefined ? undefined : decodeURIComponent(arg) };
}

function nav() {
  const cur = route().name;
  const section = { vdisk: 'vdisks', device: 'devices' }[cur] || cur;
  $('nav').replaceChildren(...NAV.filter(([k]) => can(views[k].role || 'viewer'))
    .map(([k, t]) => h('a', { href: '#/' + k, text: t, class: k === section ? 'current' : null })));
  $('who').replaceChildren(h('span', { text: `${S.me.name} (${S.me.role}) at ${S.me.server}` }),
    h('button', { id: 'logout', text: 'Sign out', onclick: () => logout('Signed out.') }));
}

function show() {
  if (!S.me) return;
  const r = route();
  S.view = r;
  S.seen = null;
  nav();
  const main = $('main');
  delete main.dataset.ready;
  main.dataset.view = r.arg === undefined ? r.name : `${r.name}/${r.arg}`;
  if (r.view.role && !can(r.view.role)) {
    main.replaceChildren(h('p', { text: `This page needs the ${r.view.role} role.` }));
    S.view = null;
    return;
  }
  main.replaceChildren(h('p', { class: 'mute', text: 'Loading…' }));
  if (r.view.mount) r.view.mount(main);
  document.title = `${r.view.title} · vstream`;
  tick();
}

async function tick() {
  if (!S.view || !S.me) return;
  const r = S.view;
  if (S.busy === r) {
    // This page's last tick is still under way: run again when it ends,
    // not a whole period later. (A tick of the page left is not waited
    // for: its answers are dropped.)
    S.again = true;
    return;
  }
  S.busy = r;
  S.again = false;
  S.texts = [];
  try {
    const data = await r.view.load(r.arg);
    if (S.view !== r) return;
    const key = S.texts.join('\u0000');
    S.lastOk = Date.now();
    $('live').className = '';
    $('live').textContent = 'live · ' + new Date().toLocaleTimeString();
    if (key !== S.seen) {
      S.seen = key;
      r.view.render(data, $('main'));
      $('main').dataset.ready = String(Number($('main').dataset.ready || 0) + 1);
    }
  } catch (e) {
    if (e.status === 401) {
      logout('The token is no longer valid: ' + e.message);
    } else {
      $('live').className = 'stale';
      $('live').textContent = 'refresh failed: ' + e.message;
      if (e.status === 404 && S.view === r) $('main').replaceChildren(h('p', { class: 'problems', text: e.message }));
    }
  } finally {
    if (S.busy === r) {
      S.busy = null;
      if (S.again) tick();
    }
  }
}

function logout(why) {
  S.token = null;
  S.me = null;
  S.view = null;
  S.etags.clear();
  sessionStorage.removeItem(TOKEN_KEY);
  $('nav').replaceChildren();
  $('who').replaceChildren();
  $('live').textContent = '';
  login(why);
}

function login(why) {
  const input = h('input', { id: 'token', type: 'password', autocomplete: 'off', placeholder: 'API token' });
  const msg = h('p', { id: 'login-error', class: 'problems', text: why || '' });
  const submit = async (ev) => {
    ev.preventDefault();
    S.token = input.value.trim();
    try {
      S.me = JSON.parse(await call('GET', '/api/v1/whoami'));
      sessionStorage.setItem(TOKEN_KEY, S.token);
      if (!location.hash || location.hash === '#/login') location.hash = '#/overview';
      show();
    } catch (e) {
      S.token = null;
      msg.textContent = e.status === 403 ? `This token cannot read the farm: ${e.message}` : e.message;
    }
  };
  $('main').replaceChildren(h('form', { class: 'login', id: 'login', onsubmit: submit },
    h('h1', { text: 'Sign in to the vstream console' }),
    h('p', { class: 'mute', text: 'Paste an API token (vstream token create NAME --role viewer|operator|admin). It stays in this tab only.' }),
    input, h('button', { class: 'primary', id: 'login-button', type: 'submit', text: 'Sign in' }), msg));
  input.focus();
}

async function start() {
  window.addEventListener('hashchange', show);
  setInterval(() => {
    if (!document.hidden) tick();
    if (S.me && S.lastOk && Date.now() - S.lastOk > 5000) $('live').className = 'stale';
  }, POLL_MS);
  if (S.token) {
    try {
      S.me = JSON.parse(await call('GET', '/api/v1/whoami'));
      show();
      return;
    } catch (e) {
      sessionStorage.removeItem(TOKEN_KEY);
      S.token = null;
      login(e.message);
      return;
    }
  }
  login('');
}

start();
