// The capability pages: each a form (ui.js) with its route, body and result.

import * as api from './api.js';
import { capabilityPage, el, mediaNode, showBlob } from './ui.js';
import { chatPage } from './chat.js';
import { recorder, regionPicker } from './widgets.js';

const ASPECTS = ['', '1:1', '16:9', '9:16', '4:3', '3:4', '3:2', '2:3', '21:9', '9:21'];
const SIZES = ['', '256x256', '512x512', '768x768', '1024x1024', '1024x768', '768x1024'];
const opts = (values, blank) => values.map((v) => [v, v || blank]);
const strip = (body) => Object.fromEntries(Object.entries(body).filter(([, v]) => v !== null && v !== '' && v !== undefined));

async function showImages({ response }, values, out) {
  const body = await response.json();
  for (const [i, item] of body.data.entries()) {
    const src = item.url ? api.mediaPath(item.url) : `data:image/${values.format || 'png'};base64,${item.b64_json}`;
    out.append(mediaNode('image', src, { name: `image-${i + 1}.${values.format || 'png'}` }));
  }
  out.append(el('p', { class: 'meta', text: `Seed ${body.seed}` }));
  return body.timing;
}

function form(values, files) {
  const data = new FormData();
  for (const [name, value] of Object.entries(values)) {
    if (value === null || value === '' || value === undefined || files.includes(name)) continue;
    data.append(name, String(value));
  }
  for (const name of files) if (values[name]) data.append(name, values[name]);
  return data;
}

const images = capabilityPage({
  title: 'Images',
  intro: 'Text to image, or edit up to four images guided by a prompt.',
  fields: [
    { name: 'mode', label: 'Mode', type: 'select', options: [['generate', 'Text to image'], ['edit', 'Edit images']], value: 'generate' },
    { name: 'prompt', label: 'Prompt', type: 'textarea', placeholder: 'a red fox in the snow' },
    { name: 'negative_prompt', label: 'Negative prompt', type: 'text' },
    { name: 'input', label: 'Image to edit', type: 'file', accept: 'image/png,image/jpeg,image/webp', when: (v) => v.mode === 'edit' },
    { name: 'aspect_ratio', label: 'Aspect ratio', type: 'select', options: opts(ASPECTS, '(default)'), when: (v) => !v.size },
    { name: 'resolution', label: 'Resolution', type: 'select', options: opts(['', '1K', '2K', '4K'], '(default)'), when: (v) => !v.size },
    { name: 'size', label: 'Size (instead of aspect and resolution)', type: 'select', options: opts(SIZES, '(by aspect and resolution)') },
    { name: 'format', label: 'Format', type: 'select', options: opts(['png', 'jpeg', 'webp']) },
    {
      name: 'style_preset', label: 'Style', type: 'select', options: [['', '(none)']], when: (v) => v.mode === 'generate',
      load: async () => [['', '(none)'], ...(await api.getJson('/v1/images/styles')).data.map((s) => [s.id, s.name || s.id])],
    },
    { name: 'n', label: 'Images', type: 'number', min: 1, max: 4, value: 1 },
    { name: 'seed', label: 'Seed (empty: random)', type: 'number', min: 0 },
  ],
  required: (v) => (v.mode === 'edit' ? ['prompt', 'input'] : ['prompt']),
  path: (v) => (v.mode === 'edit' ? '/v1/images/edits' : '/v1/images/generations'),
  encode: async (v) => {
    const common = { prompt: v.prompt, negative_prompt: v.negative_prompt, seed: v.seed, n: v.n, format: v.format };
    const size = v.size ? { size: v.size } : { aspect_ratio: v.aspect_ratio, resolution: v.resolution };
    if (v.mode === 'edit') {
      return { json: strip({ ...common, ...size, input_images: [await api.dataUrl(v.input)] }) };
    }
    return { json: strip({ ...common, ...size, style_preset: v.style_preset }) };
  },
  show: showImages,
});

const segmentation = capabilityPage({
  title: 'Segmentation',
  intro: 'Cut an object out of an image by a prompt, or remove the background of an image or a video.',
  fields: [
    {
      name: 'mode', label: 'Mode', type: 'select', value: 'segment',
      options: [['segment', 'Segment an image'], ['image', 'Remove an image\'s background'], ['video', 'Remove a video\'s background']],
    },
    { name: 'file', label: 'Image or video', type: 'file', accept: 'image/*,video/*' },
    { name: 'prompt', label: 'Object (prompt)', type: 'text', placeholder: 'the dog' },
    { name: 'output', label: 'Output', type: 'select', options: [['cutout', 'Cut-out'], ['mask', 'Mask']], when: (v) => v.mode === 'segment' },
  ],
  required: () => ['file', 'prompt'],
  path: (v) => ({ segment: '/v1/images/segmentations', image: '/v1/images/remove-background', video: '/v1/videos/remove-background' })[v.mode],
  encode: async (v) => ({
    form: form({ prompt: v.prompt, ...(v.mode === 'segment' ? { output: v.output } : {}), file: v.file }, ['file']),
  }),
  accept: (v) => (v.mode === 'video' ? 'video/webm' : 'image/png'),
  show: async ({ response }, v, out) => {
    await showBlob(response, out, v.mode === 'video' ? 'video' : 'image', { checker: true, name: v.mode === 'video' ? 'background_removed_video.webm' : 'result.png' });
    const frames = response.headers.get('X-Frames-Processed');
    if (frames) out.append(el('p', { class: 'meta', text: `${frames} frames, ${response.headers.get('X-Frames-Charged')} charged` }));
    return api.timingOf(null, response);
  },
});

const upscale = capabilityPage({
  title: 'Upscale',
  intro: 'Enlarge an image with Real-ESRGAN, Swin2SR or Lanczos.',
  fields: [
    { name: 'image', label: 'Image', type: 'file', accept: 'image/png,image/jpeg,image/webp' },
    { name: 'method', label: 'Method', type: 'select', value: 'realesrgan_2x', options: opts(['realesrgan_2x', 'realesrgan_4x', 'realesrgan_4x_anime', 'swin2sr', 'lanczos']) },
    { name: 'scale', label: 'Scale (lanczos 2-8, swin2sr 2-4)', type: 'number', min: 2, max: 8, when: (v) => ['lanczos', 'swin2sr'].includes(v.method) },
    { name: 'format', label: 'Format', type: 'select', options: opts(['png', 'jpeg', 'webp']) },
  ],
  required: () => ['image'],
  path: () => '/v1/images/upscale',
  encode: async (v) => ({
    json: strip({ image: await api.dataUrl(v.image), method: v.method, format: v.format, scale: ['lanczos', 'swin2sr'].includes(v.method) ? v.scale : null }),
  }),
  show: ({ response }, v, out) => response.json().then((body) => {
    for (const item of body.data) out.append(mediaNode('image', item.url ? api.mediaPath(item.url) : `data:image/${v.format};base64,${item.b64_json}`, { name: `upscaled.${v.format}` }));
    out.append(el('p', { class: 'meta', text: `${body.method}, ×${body.scale}` }));
    return body.timing;
  }),
});

const speech = capabilityPage({
  title: 'Speech',
  intro: 'Speak a text with a voice of the server.',
  fields: [
    { name: 'input', label: 'Text', type: 'textarea', placeholder: 'Hello from Kiln.' },
    {
      name: 'voice', label: 'Voice', type: 'select', options: [['joe', 'joe']], value: 'joe',
      load: async () => (await api.getJson('/v1/audio/voices')).data.map((voice) => [voice.id, `${voice.id} (${voice.language})`]),
    },
    { name: 'response_format', label: 'Format', type: 'select', value: 'wav', options: opts(['wav', 'mp3', 'flac', 'opus', 'aac']) },
    { name: 'speed', label: 'Speed', type: 'number', min: 0.25, max: 4, step: 0.05, value: 1 },
  ],
  required: () => ['input'],
  path: () => '/v1/audio/speech',
  encode: async (v) => ({ json: strip({ model: 'tts-1', input: v.input, voice: v.voice, response_format: v.response_format, speed: v.speed }) }),
  show: async ({ response }, v, out) => {
    await showBlob(response, out, 'audio', { name: `speech.${v.response_format}` });
    return api.timingOf(null, response);
  },
});

const clone = capabilityPage({
  title: 'Voice cloning',
  intro: 'Speak a text in the voice of a reference recording: record one here or upload it, with its transcript.',
  fields: [
    { name: 'text', label: 'Text to speak', type: 'textarea' },
    { name: 'ref_file', label: 'Reference audio (upload)', type: 'file', accept: 'audio/*' },
    { name: 'ref_text', label: 'What the reference says', type: 'text' },
    {
      name: 'language', label: 'Language', type: 'select', options: [['', '(default)']],
      load: async () => {
        const body = await api.getJson('/v1/audio/clone/languages');
        return [['', `(default: ${body.default_language})`], ...[...new Set(body.data.flatMap((m) => m.languages))].map((l) => [l, l])];
      },
    },
  ],
  widgets: [recorder('ref_recording')],
  required: (v) => ['text', v.ref_recording ? 'ref_recording' : 'ref_file', 'ref_text'],
  path: () => '/v1/audio/clone',
  encode: async (v) => ({
    json: strip({ text: v.text, ref_audio: await api.dataUrl(v.ref_recording || v.ref_file), ref_text: v.ref_text, language: v.language }),
  }),
  show: async ({ response }, v, out) => {
    await showBlob(response, out, 'audio', { name: 'cloned_voice.wav' });
    return api.timingOf(null, response);
  },
});

const music = capabilityPage({
  title: 'Music',
  intro: 'Generate a song, cover one in another style, or repaint a region of it. Progress comes from the server as it runs.',
  fields: [
    { name: 'mode', label: 'Mode', type: 'select', value: 'generate', options: [['generate', 'Generate'], ['cover', 'Cover'], ['repaint', 'Repaint a region']] },
    { name: 'audio', label: 'Source song', type: 'file', accept: 'audio/*', when: (v) => v.mode !== 'generate' },
    { name: 'prompt', label: 'Style', type: 'textarea', placeholder: 'calm piano, rain' },
    { name: 'lyrics', label: 'Lyrics', type: 'textarea', placeholder: '[verse] ...' },
    { name: 'instrumental', label: 'Instrumental', type: 'checkbox' },
    { name: 'duration', label: 'Duration (s)', type: 'number', min: 1, max: 600, step: 1, value: 10, when: (v) => v.mode === 'generate' },
    { name: 'audio_cover_strength', label: 'Cover strength (0-1)', type: 'number', min: 0, max: 1, step: 0.05, when: (v) => v.mode === 'cover' },
    { name: 'start', label: 'Region start (s)', type: 'number', min: 0, step: 0.1, value: 0, when: (v) => v.mode === 'repaint' },
    { name: 'end', label: 'Region end (s)', type: 'number', min: 0, step: 0.1, when: (v) => v.mode === 'repaint' },
    { name: 'bpm', label: 'BPM', type: 'number', min: 30, max: 300 },
    { name: 'num_inference_steps', label: 'Steps', type: 'number', min: 1, max: 50, value: 8 },
    { name: 'audio_format', label: 'Format', type: 'select', value: 'wav', options: opts(['wav', 'mp3', 'flac', 'opus', 'aac']) },
    { name: 'seed', label: 'Seed (empty: random)', type: 'number', min: 0 },
  ],
  widgets: [regionPicker('audio', 'start', 'end')],
  required: (v) => (v.mode === 'generate' ? ['prompt'] : ['prompt', 'audio']),
  path: (v) => `/v1/music/${v.mode}`,
  progress: () => true,
  encode: async (v) => {
    const body = {
      prompt: v.prompt, lyrics: v.lyrics, instrumental: v.instrumental || null, bpm: v.bpm,
      num_inference_steps: v.num_inference_steps, audio_format: v.audio_format, seed: v.seed,
    };
    if (v.mode === 'generate') body.duration = v.duration;
    if (v.mode !== 'generate') body.audio = await api.dataUrl(v.audio);
    if (v.mode === 'cover') body.audio_cover_strength = v.audio_cover_strength;
    if (v.mode === 'repaint') Object.assign(body, { start: v.start ?? 0, end: v.end });
    return { json: strip(body), query: { response_format: 'json' } };
  },
  show: ({ body }, v, out) => {
    out.append(mediaNode('audio', api.mediaPath(body.url), { name: `music.${body.audio_format}` }));
    out.append(el('p', { class: 'meta', text: `${body.duration} s, ${body.sample_rate} Hz, seed ${body.seed}, ${body.credits_charged} credits` }));
    return body.timing;
  },
});

const video = capabilityPage({
  title: 'Image to video',
  intro: 'Animate a picture. Progress comes from the server step by step.',
  fields: [
    { name: 'image', label: 'Image', type: 'file', accept: 'image/png,image/jpeg,image/webp' },
    { name: 'prompt', label: 'How it moves', type: 'textarea' },
    { name: 'negative_prompt', label: 'What to avoid', type: 'text' },
    { name: 'num_frames', label: 'Frames (4k+1)', type: 'number', min: 1, value: 17 },
    { name: 'num_steps', label: 'Steps', type: 'number', min: 1, value: 4 },
    { name: 'resolution', label: 'Resolution', type: 'select', value: '480p', options: opts(['480p', '720p', '1080p']) },
    { name: 'use_ode', label: 'Deterministic sampler', type: 'checkbox' },
    { name: 'seed', label: 'Seed (empty: random)', type: 'number', min: 0 },
  ],
  required: () => ['image', 'prompt'],
  path: () => '/v1/images/img2video',
  progress: () => true,
  encode: async (v) => ({ form: form({ ...v, use_ode: v.use_ode ? 'true' : null }, ['image']) }),
  show: ({ body }, v, out) => {
    out.append(mediaNode('video', api.mediaPath(body.url), { name: 'video.mp4' }));
    out.append(el('p', { class: 'meta', text: `seed ${body.seed}, ${body.resolution}, ${body.credits_charged} credits` }));
    return body.timing;
  },
});

/** The pages in the nav's order: [fragment, title, render(container, ctx)]. */
export const PAGES = [
  ['image', 'Images', images],
  ['chat', 'Chat', chatPage],
  ['music', 'Music', music],
  ['segment', 'Segmentation', segmentation],
  ['upscale', 'Upscale', upscale],
  ['speech', 'Speech', speech],
  ['clone', 'Voice cloning', clone],
  ['video', 'Image to video', video],
];
