// The shape every capability page shares: a form of fields, the price of the request as it
// stands (a dry run, redone as the form changes; Run stays off until it is known and the
// balance covers it), a progress bar fed by the server's progress events, the result inline
// and the answer's timing breakdown.

import * as api from './api.js';

/** document.createElement with attributes (`text`: textContent, `on<event>`: a listener). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === 'text') node.textContent = value;
    else if (name.startsWith('on')) node.addEventListener(name.slice(2), value);
    else if (name in node && typeof value !== 'string') node[name] = value;
    else node.setAttribute(name, value === true ? '' : value);
  }
  for (const child of children.flat()) if (child !== null && child !== undefined) node.append(child);
  return node;
}

function debounce(fn, ms) {
  let timer;
  return () => {
    clearTimeout(timer);
    timer = setTimeout(fn, ms);
  };
}

/** A timing object (milliseconds by name) as a small table. */
export function timingTable(timing) {
  if (!timing) return el('p', { class: 'meta', text: 'No timing in this answer.' });
  const rows = Object.entries(timing).map(([name, ms]) =>
    el('tr', {}, el('th', { text: name.replace(/_ms$/, '') }), el('td', { text: `${Number(ms).toFixed(1)} ms` })),
  );
  return el('table', { class: 'timing', 'data-testid': 'timing-table' }, el('caption', { text: 'Timing' }), rows);
}

/** A media element for a URL; `checker` puts it on a checkerboard (transparency shows). */
export function mediaNode(kind, src, { checker = false, name = 'result' } = {}) {
  let node;
  if (kind === 'image') node = el('img', { src, alt: name });
  else if (kind === 'video') node = el('video', { src, controls: true, loop: true, muted: true, autoplay: true });
  else node = el('audio', { src, controls: true });
  const link = el('a', { href: src, download: name, text: 'Download' });
  return el('div', {}, checker ? el('div', { class: 'checker' }, node) : node, link);
}

/** A binary answer shown inline (from its bytes, as a blob: URL). */
export async function showBlob(response, out, kind, options = {}) {
  const url = URL.createObjectURL(await response.blob());
  out.append(mediaNode(kind, url, options));
}

function optionNodes(options, selected) {
  return options.map(([value, label]) => el('option', { value, text: label, selected: value === selected }));
}

/** One form field: {node, get(), input}. Types: text, textarea, number, select, checkbox, file. */
function makeField(spec, form) {
  const id = `f-${spec.name}`;
  let input;
  if (spec.type === 'textarea') {
    input = el('textarea', { id, name: spec.name, placeholder: spec.placeholder || '' });
    input.value = spec.value || '';
  } else if (spec.type === 'select') {
    input = el('select', { id, name: spec.name }, optionNodes(spec.options || [], spec.value));
    if (spec.load) {
      spec.load().then((options) => {
        const keep = input.value;
        input.replaceChildren(...optionNodes(options, spec.value));
        if ([...input.options].some((o) => o.value === keep) && keep) input.value = keep;
        form.dispatchEvent(new Event('input'));
      }).catch(() => {});
    }
  } else if (spec.type === 'checkbox') {
    input = el('input', { id, name: spec.name, type: 'checkbox', checked: Boolean(spec.value) });
  } else if (spec.type === 'file') {
    input = el('input', { id, name: spec.name, type: 'file', accept: spec.accept || '' });
  } else {
    input = el('input', {
      id, name: spec.name, type: spec.type || 'text', placeholder: spec.placeholder || '',
      min: spec.min, max: spec.max, step: spec.step,
    });
    if (spec.value !== undefined) input.value = spec.value;
  }
  const label = spec.type === 'checkbox'
    ? el('label', { class: 'check', for: id }, input, spec.label)
    : el('label', { for: id }, spec.label, input);
  const get = () => {
    if (spec.type === 'checkbox') return input.checked;
    if (spec.type === 'file') return input.files[0] || null;
    if (spec.type === 'number') return input.value === '' ? null : Number(input.value);
    return input.value;
  };
  return { spec, node: label, input, get };
}

/** The values a form's fields hold, by name; widgets (region picker, recorder) add theirs. */
function readValues(fields) {
  const values = {};
  for (const f of fields) values[f.spec.name] = f.get();
  return values;
}

/** A capability page from its definition:
 *  {title, intro, fields, path(values), encode(values) -> {json|form, query}, required(values) -> [names],
 *   progress(values) -> bool, accept(values), show({response, body}, values, out), widgets: [(ctx) => node]} */
export function capabilityPage(def) {
  return (container, ctx) => {
    const form = el('form', { class: 'card', 'data-testid': 'form' });
    const fields = def.fields.map((spec) => makeField(spec, form));
    const priceNode = el('p', { class: 'price', 'data-testid': 'price', text: 'Price: fill in the form' });
    const run = el('button', { type: 'submit', disabled: true, 'data-testid': 'run', text: def.runLabel || 'Run' });
    const bar = el('progress', { hidden: true, 'data-testid': 'progress', value: 0, max: 1 });
    const status = el('p', { class: 'status', 'data-testid': 'status', role: 'status' });
    const error = el('p', { class: 'error', role: 'alert', 'data-testid': 'error' });
    const result = el('div', { class: 'result', 'data-testid': 'result' });
    const timing = el('div', { 'data-testid': 'timing' });
    const byName = Object.fromEntries(fields.map((f) => [f.spec.name, f]));
    const widgetCtx = { form, byName, el };
    const widgets = (def.widgets || []).map((make) => make(widgetCtx));
    form.append(...fields.map((f) => f.node), ...widgets.map((w) => w.node), el('div', { class: 'row' }, run, priceNode));
    container.append(
      el('h1', { text: def.title }),
      el('p', { class: 'note', text: def.intro }),
      el('div', { class: 'grid' }, form, el('div', { class: 'card result-card' }, bar, status, error, result, timing)),
    );

    const values = () => {
      const v = readValues(fields);
      for (const w of widgets) Object.assign(v, w.values ? w.values() : {});
      return v;
    };
    let generation = 0;
    let running = false;
    async function reprice() {
      const mine = ++generation;
      const v = values();
      for (const f of fields) f.node.hidden = Boolean(f.spec.when && !f.spec.when(v));
      for (const w of widgets) if (w.when) w.node.hidden = !w.when(v);
      run.disabled = true;
      error.textContent = '';
      priceNode.classList.remove('short');
      const missing = (def.required ? def.required(v) : []).filter((name) => v[name] === null || v[name] === '');
      if (missing.length) {
        priceNode.textContent = `Price: fill in ${missing.join(', ')}`;
        return;
      }
      priceNode.textContent = 'Price: …';
      try {
        const preview = await api.price(def.path(v), await def.encode(v));
        if (mine !== generation) return;
        priceNode.textContent = `Price: ${preview.cost} credits${preview.balance_sufficient ? '' : ' (more than your balance)'}`;
        priceNode.classList.toggle('short', !preview.balance_sufficient);
        run.disabled = running || !preview.balance_sufficient;
      } catch (err) {
        if (mine !== generation) return;
        priceNode.textContent = 'Price: not available';
        error.textContent = err.message;
      }
    }
    const later = debounce(reprice, 250);
    form.addEventListener('input', later);
    form.addEventListener('change', later);
    form.addEventListener('submit', async (event) => {
      event.preventDefault();
      if (running) return;
      running = true;
      run.disabled = true;
      error.textContent = '';
      result.replaceChildren();
      timing.replaceChildren();
      const v = values();
      const started = performance.now();
      status.textContent = 'Running…';
      try {
        const payload = await def.encode(v);
        let shown;
        if (def.progress && def.progress(v)) {
          bar.hidden = false;
          bar.removeAttribute('value'); // indeterminate until the first step
          const body = await api.withProgress('POST', def.path(v), payload, (step, total) => {
            bar.max = total;
            bar.value = step;
            status.textContent = `Step ${step} of ${total}`;
          });
          if (bar.hasAttribute('value')) bar.value = bar.max; // the last step's event has come
          else [bar.max, bar.value] = [1, 1];
          shown = await def.show({ body }, v, result);
        } else {
          const accept = def.accept ? def.accept(v) : undefined;
          const response = await api.request('POST', def.path(v), { ...payload, accept });
          shown = await def.show({ response }, v, result);
        }
        const seconds = ((performance.now() - started) / 1000).toFixed(1);
        status.textContent = `Done in ${seconds} s`;
        status.dataset.done = 'true';
        timing.append(timingTable(shown));
      } catch (err) {
        status.textContent = 'Failed';
        error.textContent = err.message || String(err);
      } finally {
        running = false;
        ctx.refreshBalance();
        reprice();
      }
    });
    reprice();
  };
}
