// The chat page: a conversation streamed token by token (stream: true, server-sent
// chat.completion.chunk events until [DONE]), with an optional image per message.

import * as api from './api.js';
import { el, timingTable } from './ui.js';

export function chatPage(container, ctx) {
  const history = [];
  const log = el('div', { class: 'chat-log', 'data-testid': 'chat-log', 'aria-live': 'polite' });
  const model = el('select', { name: 'model', id: 'f-model' });
  const system = el('input', { name: 'system', id: 'f-system', placeholder: 'Answer briefly.' });
  const message = el('textarea', { name: 'message', id: 'f-message', placeholder: 'Ask something…' });
  const image = el('input', { name: 'image', id: 'f-image', type: 'file', accept: 'image/png,image/jpeg,image/webp' });
  const maxTokens = el('input', { name: 'max_tokens', id: 'f-max_tokens', type: 'number', min: 1, value: '256' });
  const temperature = el('input', { name: 'temperature', id: 'f-temperature', type: 'number', min: 0, max: 2, step: 0.1, value: '0.7' });
  const run = el('button', { type: 'submit', disabled: true, 'data-testid': 'run', text: 'Send' });
  const reset = el('button', { type: 'button', class: 'secondary', text: 'New conversation' });
  const priceNode = el('p', { class: 'price', 'data-testid': 'price', text: 'Price: type a message' });
  const status = el('p', { class: 'status', 'data-testid': 'status', role: 'status' });
  const error = el('p', { class: 'error', role: 'alert', 'data-testid': 'error' });
  const timing = el('div', { 'data-testid': 'timing' });
  const form = el(
    'form', { class: 'card', 'data-testid': 'form' },
    el('label', { for: 'f-model' }, 'Model', model),
    el('label', { for: 'f-system' }, 'System prompt', system),
    el('label', { for: 'f-message' }, 'Message', message),
    el('label', { for: 'f-image' }, 'Image (optional)', image),
    el('label', { for: 'f-max_tokens' }, 'Max tokens', maxTokens),
    el('label', { for: 'f-temperature' }, 'Temperature', temperature),
    el('div', { class: 'row' }, run, reset, priceNode),
  );
  container.append(
    el('h1', { text: 'Chat' }),
    el('p', { class: 'note', text: 'A conversation streamed as it is written; attach an image for a vision model. Premium accounts only.' }),
    el('div', { class: 'grid' }, form, el('div', { class: 'card' }, log, status, error, timing)),
  );

  api.getJson('/v1/models').then(({ data }) => {
    const chat = data.filter((m) => m.capability === 'chat' || (m.capabilities || []).includes('chat'));
    model.replaceChildren(...chat.map((m) => el('option', { value: m.id, text: m.id })));
    reprice();
  }).catch((err) => { error.textContent = err.message; });

  async function userMessage() {
    const text = message.value.trim();
    const file = image.files[0];
    if (!file) return { role: 'user', content: text };
    return { role: 'user', content: [{ type: 'text', text }, { type: 'image_url', image_url: { url: await api.dataUrl(file) } }] };
  }
  async function body(stream) {
    const messages = [...(system.value.trim() ? [{ role: 'system', content: system.value.trim() }] : []), ...history, await userMessage()];
    const request = { model: model.value, messages, stream, max_tokens: Number(maxTokens.value) || undefined };
    if (temperature.value !== '') request.temperature = Number(temperature.value);
    if (stream) request.stream_options = { include_usage: true };
    return request;
  }

  let generation = 0;
  let running = false;
  async function reprice() {
    const mine = ++generation;
    run.disabled = true;
    error.textContent = '';
    if (!message.value.trim() || !model.value) {
      priceNode.textContent = 'Price: type a message';
      return;
    }
    priceNode.textContent = 'Price: …';
    try {
      const preview = await api.price('/v1/chat/completions', { json: await body(true) });
      if (mine !== generation) return;
      priceNode.textContent = `Price: ${preview.cost} credits`;
      run.disabled = running || !preview.balance_sufficient;
    } catch (err) {
      if (mine !== generation) return;
      priceNode.textContent = 'Price: not available';
      error.textContent = err.message;
    }
  }
  let timer;
  form.addEventListener('input', () => { clearTimeout(timer); timer = setTimeout(reprice, 250); });
  reset.addEventListener('click', () => { history.length = 0; log.replaceChildren(); });

  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    if (running) return;
    running = true;
    run.disabled = true;
    error.textContent = '';
    timing.replaceChildren();
    const request = await body(true);
    const sent = request.messages[request.messages.length - 1];
    const shown = el('div', { class: 'msg user', text: message.value.trim() });
    if (image.files[0]) shown.append(el('img', { src: URL.createObjectURL(image.files[0]), alt: 'attached image' }));
    const answer = el('div', { class: 'msg assistant', 'data-testid': 'assistant' });
    log.append(shown, answer);
    const started = performance.now();
    let firstToken = null;
    let usage = null;
    status.textContent = 'Writing…';
    try {
      const response = await api.request('POST', '/v1/chat/completions', { json: request, accept: 'text/event-stream' });
      for await (const { data } of api.events(response)) {
        if (data === '[DONE]') break;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new api.ApiError(500, chunk.error.type, chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) {
          firstToken ??= performance.now() - started;
          answer.textContent += delta.content;
          log.scrollTop = log.scrollHeight;
        }
      }
      history.push(sent, { role: 'assistant', content: answer.textContent });
      message.value = '';
      image.value = '';
      const total = performance.now() - started;
      status.textContent = usage
        ? `Done: ${usage.prompt_tokens} prompt and ${usage.completion_tokens} completion tokens`
        : 'Done';
      status.dataset.done = 'true';
      timing.append(timingTable({ first_token_ms: firstToken ?? total, total_ms: total }));
    } catch (err) {
      status.textContent = 'Failed';
      error.textContent = err.message;
    } finally {
      running = false;
      ctx.refreshBalance();
      reprice();
    }
  });
}
