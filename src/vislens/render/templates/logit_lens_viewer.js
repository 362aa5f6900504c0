const D = JSON.parse(document.getElementById('lens-data').textContent);
const detail = document.getElementById('detail');
let last = null;
function clear() {
  if (last) { last[0].classList.remove('hl'); last[1].classList.remove('hl'); }
}
document.getElementById('lens').addEventListener('mouseover', e => {
  const td = e.target.closest('td,th'); if (!td || td.dataset.t === undefined) return;
  const t = +td.dataset.t; const p = document.getElementById('p' + t);
  clear(); p.classList.add('hl'); td.classList.add('hl'); last = [p, td];
  if (td.dataset.l === undefined) { detail.textContent = 'token ' + t; return; }
  const l = +td.dataset.l;
  detail.innerHTML = '<b>' + td.parentNode.firstChild.textContent + ', layer ' + l + '</b><br>' +
    D[t][l].map(([w, q]) => w.replace(/[<>&]/g, '') + ' ' + (100 * q).toFixed(1) + '%')
      .join('<br>');
});
document.getElementById('filter').addEventListener('input', e => {
  const w = e.target.value.trim().toLowerCase(); let n = 0;
  document.querySelectorAll('#lens td').forEach(td => {
    const hit = w !== '' && D[+td.dataset.t][+td.dataset.l].some(([x]) => x.toLowerCase() === w);
    td.classList.toggle('match', hit); n += hit;
  });
  document.querySelectorAll('.patch').forEach((p, t) => p.classList.toggle('match',
    w !== '' && D[t].some(layer => layer.some(([x]) => x.toLowerCase() === w))));
  document.getElementById('count').textContent = w ? n + ' cells' : '';
});
