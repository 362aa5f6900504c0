const D = JSON.parse(document.getElementById('patch-data').textContent);
const S = {e: 0, what: 'exact', view: 0};
const patches = [...document.querySelectorAll('#img .patch')];
const mark = document.getElementById('mark');
const fmt = x => x === null ? '–' : x.toFixed(3);
function colour(x, m) {
  if (x === null || m <= 0) return 'transparent';
  const a = 0.85 * Math.min(1, Math.abs(x) / m);
  return (x >= 0 ? 'rgba(214,39,40,' : 'rgba(31,119,180,') + a.toFixed(3) + ')';
}
function draw() {
  const E = D.effects[S.e], vals = E[S.what], shown = new Set(D.views[S.view]);
  let m = 0;
  shown.forEach(i => { if (vals[i] !== null) m = Math.max(m, Math.abs(vals[i])); });
  patches.forEach((p, i) => {
    p.classList.toggle('off', !shown.has(i));
    p.style.background = colour(vals[i], m);
  });
  document.getElementById('lo').textContent = '-' + m.toFixed(3);
  document.getElementById('hi').textContent = '+' + m.toFixed(3);
  document.getElementById('now').textContent = E.kind + ', layer ' + E.layer + ', ' +
    (S.what === 'exact' ? 'exact patching' : 'attribution patching');
  document.querySelectorAll('#effects button').forEach(b =>
    b.classList.toggle('on', +b.dataset.e === S.e));
  document.querySelectorAll('#views button').forEach(b =>
    b.classList.toggle('on', +b.dataset.view === S.view));
}
function show(i) {
  patches.forEach(p => p.classList.remove('hl'));
  document.querySelectorAll('#tokens tr.hl').forEach(r => r.classList.remove('hl'));
  if (i === null) { mark.style.display = 'none'; return; }
  patches[i].classList.add('hl');
  const row = document.querySelector('#tokens tr[data-t="' + i + '"]');
  if (row) row.classList.add('hl');
  const b = D.box[i], s = D.scale;
  Object.assign(mark.style, {display: 'block', left: b[0] * s + 'px', top: b[1] * s + 'px',
    width: (b[2] - b[0]) * s + 'px', height: (b[3] - b[1]) * s + 'px'});
  document.getElementById('detail').innerHTML = '<b>token at position ' + D.pos[i] +
    ' (tile ' + D.tile[i] + (D.obj[i] ? ', on the object' : '') + ')</b><br>' +
    D.effects.map(E => E.kind + ' layer ' + E.layer + ': exact ' + fmt(E.exact[i]) +
      ', attribution ' + fmt(E.estimate[i])).join('<br>');
}
patches.forEach((p, i) => p.addEventListener('mouseenter', () => show(i)));
document.querySelectorAll('#tokens tr[data-t]').forEach(r =>
  r.addEventListener('mouseenter', () => show(+r.dataset.t)));
document.getElementById('effects').addEventListener('click', e => {
  if (e.target.dataset.e !== undefined) { S.e = +e.target.dataset.e; draw(); }
});
document.querySelectorAll('#what input').forEach(r => r.addEventListener('change', () => {
  S.what = r.value; draw();
}));
const views = document.getElementById('views');
if (views) views.addEventListener('click', e => {
  if (e.target.dataset.view !== undefined) { S.view = +e.target.dataset.view; draw(); }
});
draw();
