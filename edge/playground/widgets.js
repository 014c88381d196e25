// Form widgets beyond plain inputs: a microphone recorder (the reference of a cloned voice) and
// a region picker drawn over a song's waveform (music repaint).

import { el } from './ui.js';

/** 16-bit PCM WAV of an AudioBuffer's first channel (the recording, decoded by the browser). */
function wav(buffer) {
  const samples = buffer.getChannelData(0);
  const bytes = new DataView(new ArrayBuffer(44 + samples.length * 2));
  const text = (offset, s) => [...s].forEach((c, i) => bytes.setUint8(offset + i, c.charCodeAt(0)));
  text(0, 'RIFF');
  bytes.setUint32(4, 36 + samples.length * 2, true);
  text(8, 'WAVEfmt ');
  bytes.setUint32(16, 16, true);
  bytes.setUint16(20, 1, true);
  bytes.setUint16(22, 1, true);
  bytes.setUint32(24, buffer.sampleRate, true);
  bytes.setUint32(28, buffer.sampleRate * 2, true);
  bytes.setUint16(32, 2, true);
  bytes.setUint16(34, 16, true);
  text(36, 'data');
  bytes.setUint32(40, samples.length * 2, true);
  samples.forEach((s, i) => bytes.setInt16(44 + i * 2, Math.max(-1, Math.min(1, s)) * 0x7fff, true));
  return new File([bytes], 'reference.wav', { type: 'audio/wav' });
}

/** Record from the microphone; the value `name` is the recording as a WAV file (or null). */
export function recorder(name) {
  return ({ form }) => {
    let recording = null;
    let media = null;
    const button = el('button', { type: 'button', class: 'secondary', text: 'Record a reference' });
    const clear = el('button', { type: 'button', class: 'secondary', text: 'Clear', hidden: true });
    const player = el('audio', { controls: true, hidden: true });
    const note = el('span', { class: 'meta' });
    button.addEventListener('click', async () => {
      if (media) {
        media.stop();
        return;
      }
      try {
        const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
        const chunks = [];
        media = new MediaRecorder(stream);
        media.ondataavailable = (event) => chunks.push(event.data);
        media.onstop = async () => {
          stream.getTracks().forEach((track) => track.stop());
          media = null;
          button.textContent = 'Record again';
          const context = new AudioContext();
          const decoded = await context.decodeAudioData(await new Blob(chunks).arrayBuffer());
          recording = wav(decoded);
          player.src = URL.createObjectURL(recording);
          player.hidden = false;
          clear.hidden = false;
          note.textContent = `${decoded.duration.toFixed(1)} s recorded (used instead of an upload)`;
          form.dispatchEvent(new Event('input'));
        };
        media.start();
        button.textContent = 'Stop recording';
        note.textContent = 'Recording…';
      } catch (err) {
        note.textContent = `No microphone: ${err.message}`;
      }
    });
    clear.addEventListener('click', () => {
      recording = null;
      player.hidden = true;
      clear.hidden = true;
      note.textContent = '';
      form.dispatchEvent(new Event('input'));
    });
    return {
      node: el('div', { class: 'recorder' }, button, clear, note, player),
      values: () => ({ [name]: recording }),
    };
  };
}

/** A waveform of the file field `source`; dragging over it sets the number fields `start` and `end`. */
export function regionPicker(source, start, end) {
  return ({ form, byName }) => {
    const canvas = el('canvas', { class: 'wave', width: 800, height: 80, 'data-testid': 'region' });
    const player = el('audio', { controls: true });
    const node = el('div', { hidden: true }, el('p', { class: 'meta', text: 'Drag over the song to choose the region to repaint.' }), canvas, player);
    let peaks = null;
    let duration = 0;
    const draw = () => {
      const g = canvas.getContext('2d');
      g.clearRect(0, 0, canvas.width, canvas.height);
      if (!peaks) return;
      const from = Number(byName[start].input.value || 0);
      const to = Number(byName[end].input.value || duration);
      g.fillStyle = 'rgba(194, 65, 12, .18)';
      g.fillRect((from / duration) * canvas.width, 0, ((to - from) / duration) * canvas.width, canvas.height);
      g.fillStyle = '#57534e';
      peaks.forEach((p, x) => g.fillRect(x, (canvas.height * (1 - p)) / 2, 1, canvas.height * p));
    };
    byName[source].input.addEventListener('change', async () => {
      const file = byName[source].get();
      peaks = null;
      draw();
      if (!file) return;
      player.src = URL.createObjectURL(file);
      try {
        const buffer = await new AudioContext().decodeAudioData(await file.arrayBuffer());
        const data = buffer.getChannelData(0);
        const per = Math.max(1, Math.floor(data.length / canvas.width));
        peaks = Array.from({ length: canvas.width }, (_, x) => {
          let top = 0;
          for (let i = x * per; i < (x + 1) * per && i < data.length; i++) top = Math.max(top, Math.abs(data[i]));
          return top;
        });
        duration = buffer.duration;
        byName[end].input.max = duration.toFixed(1);
        if (!byName[end].input.value) byName[end].input.value = duration.toFixed(1);
        draw();
      } catch {
        // not decodable here: the numbers still work
      }
    });
    let anchor = null;
    const at = (event) => {
      const box = canvas.getBoundingClientRect();
      return Math.max(0, Math.min(duration, ((event.clientX - box.left) / box.width) * duration));
    };
    canvas.addEventListener('pointerdown', (event) => {
      if (!duration) return;
      anchor = at(event);
      canvas.setPointerCapture(event.pointerId);
    });
    canvas.addEventListener('pointermove', (event) => {
      if (anchor === null) return;
      const here = at(event);
      byName[start].input.value = Math.min(anchor, here).toFixed(1);
      byName[end].input.value = Math.max(anchor, here).toFixed(1);
      draw();
    });
    canvas.addEventListener('pointerup', () => {
      anchor = null;
      form.dispatchEvent(new Event('input'));
    });
    form.addEventListener('input', draw);
    return { node, when: (v) => v.mode === 'repaint' };
  };
}
