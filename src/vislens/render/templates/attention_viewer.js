const D = JSON.parse(document.getElementById('att-data').textContent);
const COLORS = $colors;
const bytes = s => Uint8Array.from(atob(s), c => c.charCodeAt(0));
const MEAN = bytes(D.mean), HEAD = bytes(D.head);
const S = {layer: $start, head: -1, pin: -1, view: D.views[0].tile};
const patches = [...document.querySelectorAll('.patch')];
const STOPS = [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]];
function cmap(t, opaque) {
  t = Math.max(0, Math.min(1, t)); const x = t * (STOPS.length - 1);
  const i = Math.min(STOPS.length - 2, Math.floor(x)), f = x - i;
  const c = STOPS[i].map((a, k) => Math.round(a + f * (STOPS[i + 1][k] - a)));
  const alpha = opaque ? 1 : 0.12 + 0.8 * Math.sqrt(t);
  return 'rgba(' + c.join(',') + ',' + alpha.toFixed(3) + ')';
}
document.getElementById('grad').style.background =
  'linear-gradient(90deg,' + [0, .25, .5, .75, 1].map(t => cmap(t, true)).join(',') + ')';
const IMG = document.querySelector('#img img');
function value(l, h, i) {
  if (h < 0) return MEAN[l * D.N + i] / 255 * D.meanScale[l];
  const k = l * D.H + h; return HEAD[k * D.N + i] / 255 * D.headScale[k];
}
const inView = i => D.tile[i] === S.view;
function viewMax(l, h) {
  let m = 0; for (let i = 0; i < D.N; i++) if (inView(i)) m = Math.max(m, value(l, h, i));
  return m;
}
function scaleFor(l, h) {
  if (!document.getElementById('shared').checked) return viewMax(l, h);
  let m = 0; for (let k = 0; k < D.L; k++) m = Math.max(m, viewMax(k, h)); return m;
}
const pct = v => (100 * v).toFixed(v < 0.001 ? 3 : 1) + '%';
function paint(canvas, l, h, width) {
  const ctx = canvas.getContext('2d'); const s = width / $width * D.scaleX;
  canvas.width = width; canvas.height = Math.round(width * $height / $width);
  ctx.fillStyle = '#111'; ctx.fillRect(0, 0, canvas.width, canvas.height);
  if (IMG.complete) {
    ctx.globalAlpha = 0.45; ctx.drawImage(IMG, 0, 0, canvas.width, canvas.height);
    ctx.globalAlpha = 1;
  }
  const m = scaleFor(l, h);
  for (let i = 0; i < D.N; i++) {
    if (!inView(i)) continue; const b = D.box[i];
    ctx.fillStyle = cmap(m > 0 ? value(l, h, i) / m : 0);
    ctx.fillRect(b[0] * s, b[1] * s, (b[2] - b[0]) * s, (b[3] - b[1]) * s);
  }
}
function thumb(onhover, onclick) {
  const d = document.createElement('div'); d.className = 'thumb';
  const c = document.createElement('canvas'); const t = document.createElement('div');
  d.append(c, t); d.addEventListener('mouseenter', onhover);
  if (onclick) d.addEventListener('click', onclick); return [d, c, t];
}
const layerThumbs = [], headThumbs = [];
for (let l = 0; l < D.L; l++) {
  const [d, c, t] = thumb(() => setLayer(l));
  t.textContent = 'L' + l + ' · image ' + pct(mean(D.mass.image[l]));
  document.getElementById('layers').append(d); layerThumbs.push([d, c]);
}
for (let h = 0; h < D.H; h++) {
  const [d, c, t] = thumb(() => { S.head = h; draw(); },
    () => { S.pin = S.pin === h ? -1 : h; S.head = S.pin; draw(); });
  d.dataset.h = h; d.addEventListener('mouseleave', () => { S.head = S.pin; draw(); });
  document.getElementById('heads').append(d); headThumbs.push([d, c, t]);
}
function mean(a) { return a.reduce((x, y) => x + y, 0) / a.length; }
function xy(l, v) {
  const w = 380, left = 34, right = 10, top = 8, bottom = 26, h = 150;
  const x = D.L > 1 ? left + l / (D.L - 1) * (w - left - right) : (w + left) / 2;
  return x.toFixed(1) + ',' + (top + (1 - v) * (h - top - bottom)).toFixed(1);
}
function draw() {
  const l = S.layer, h = S.head, m = scaleFor(l, h);
  patches.forEach((p, i) => {
    p.classList.toggle('off', !inView(i));
    p.style.background = inView(i) ? cmap(m > 0 ? value(l, h, i) / m : 0) : '';
  });
  const who = h < 0 ? 'mean over heads' : 'head ' + h;
  const mass = k => h < 0 ? mean(D.mass[k][l]) : D.mass[k][l][h];
  document.getElementById('now').textContent = 'layer ' + l + ', ' + who + ': image ' +
    pct(mass('image')) + ', text ' + pct(mass('text')) + ', first token ' + pct(mass('first'));
  document.getElementById('max').textContent = pct(m);
  layerThumbs.forEach(([d, c], k) => { d.classList.toggle('on', k === l); });
  headThumbs.forEach(([d, c, t], k) => {
    d.classList.toggle('on', k === h); d.classList.toggle('pin', k === S.pin);
    paint(c, l, k, 72); t.textContent = 'h' + k + ' · ' + pct(D.mass.image[l][k]);
  });
  const cur = document.getElementById('cursor'); const x = xy(l, 0).split(',')[0];
  cur.setAttribute('x1', x); cur.setAttribute('x2', x);
  for (const k of ['image', 'text', 'first']) document.getElementById('h-' + k)
    .setAttribute('points', h < 0 ? '' : D.mass[k].map((r, j) => xy(j, r[h])).join(' '));
  document.querySelectorAll('#masses tr[data-l]').forEach(r =>
    r.classList.toggle('on', +r.dataset.l === l));
  document.querySelectorAll('#views button').forEach(b =>
    b.classList.toggle('on', +b.dataset.view === S.view));
  document.getElementById('layer').value = l;
}
function drawLayers() { layerThumbs.forEach(([d, c], k) => paint(c, k, -1, 64)); }
function setLayer(l) { S.layer = l; draw(); }
document.getElementById('layer').addEventListener('input', e => setLayer(+e.target.value));
document.getElementById('shared').addEventListener('change', () => { draw(); drawLayers(); });
document.getElementById('objbox').addEventListener('change', e =>
  document.body.classList.toggle('objline', e.target.checked));
document.querySelectorAll('#views button').forEach(b => b.addEventListener('click', () => {
  S.view = +b.dataset.view; draw(); drawLayers(); }));
document.querySelectorAll('#massplot rect.lhit, #masses tr[data-l]').forEach(r =>
  r.addEventListener('mouseenter', () => setLayer(+r.dataset.l)));
let last = null;
document.getElementById('img').addEventListener('mouseover', e => {
  const p = e.target.closest('.patch'); if (!p) return;
  if (last) last.classList.remove('hl'); p.classList.add('hl'); last = p;
  const i = +p.dataset.i, l = S.layer, h = S.head, v = value(l, h, i);
  let rank = 1; for (let k = 0; k < D.N; k++) if (inView(k) && value(l, h, k) > v) rank++;
  const heads = []; for (let k = 0; k < D.H; k++) heads.push('h' + k + ' ' + pct(value(l, k, i)));
  document.getElementById('detail').innerHTML = '<b>' + D.views.find(w => w.tile === D.tile[i])
    .label + ', row ' + D.row[i] + ', col ' + D.col[i] + (D.obj[i] ? ' (object)' : '') +
    '</b>: ' + pct(v) + ' of the attention in layer ' + l + ' (' + (h < 0 ? 'mean' : 'head ' + h) +
    '), rank ' + rank + '<br>' + heads.join(' · ');
});
draw(); drawLayers();
IMG.addEventListener('load', () => { draw(); drawLayers(); });
