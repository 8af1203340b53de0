/** Self-contained HTML timeline of ORT runs: one SVG per measured run, one lane per stage, one bar per run. */

export interface TimelineRun {
  /** Unix ms at which the ORT run started (the worker's clock; same host). */
  startMs: number;
  ms: number;
  /** Sessions that shared the run. */
  batch: number;
}

export interface TimelineLane {
  label: string;
  runs: TimelineRun[];
  /** Shown next to the label, e.g. "busy 63%". */
  note?: string;
}

export interface TimelineSection {
  title: string;
  subtitle?: string;
  /** The measured window (unix ms). */
  startMs: number;
  endMs: number;
  lanes: TimelineLane[];
}

const PALETTE = ['#4e79a7', '#59a14f', '#edc948', '#f28e2b', '#e15759', '#b07aa1', '#76b7b2', '#9c755f'];
const OVERFLOW = '#222222';
export const batchColor = (batch: number): string => (batch >= 1 && batch <= PALETTE.length ? PALETTE[batch - 1] : OVERFLOW);

const esc = (s: string): string => s.replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]!);

function niceStep(span: number, target = 10): number {
  const raw = span / target;
  const p = 10 ** Math.floor(Math.log10(raw || 1));
  for (const m of [1, 2, 5, 10]) if (m * p >= raw) return m * p;
  return 10 * p;
}

const LABEL_W = 230;
const PLOT_W = 1100;
const LANE_H = 26;
const LANE_GAP = 8;
const AXIS_H = 28;

function renderSection(s: TimelineSection, index: number): string {
  const span = Math.max(s.endMs - s.startMs, 1e-3);
  const x = (t: number) => LABEL_W + ((t - s.startMs) / span) * PLOT_W;
  const height = AXIS_H + s.lanes.length * (LANE_H + LANE_GAP) + 10;
  const parts: string[] = [];
  const step = niceStep(span);
  for (let t = 0; t <= span + 1e-9; t += step) {
    const px = x(s.startMs + t).toFixed(1);
    parts.push(`<line x1="${px}" x2="${px}" y1="${AXIS_H - 6}" y2="${height - 10}" stroke="#ddd"/><text x="${px}" y="${AXIS_H - 10}" font-size="10" text-anchor="middle" fill="#555">${t >= 1000 ? `${(t / 1000).toFixed(step >= 1000 ? 0 : 1)} s` : `${+t.toFixed(2)} ms`}</text>`);
  }
  s.lanes.forEach((lane, i) => {
    const y = AXIS_H + i * (LANE_H + LANE_GAP);
    parts.push(`<g class="lane" data-stage="${i}">`);
    parts.push(`<rect x="${LABEL_W}" y="${y}" width="${PLOT_W}" height="${LANE_H}" fill="#f6f6f6"/>`);
    parts.push(`<text x="6" y="${y + 12}" font-size="11" fill="#222">${esc(lane.label)}</text>`);
    if (lane.note) parts.push(`<text x="6" y="${y + 24}" font-size="10" fill="#666">${esc(lane.note)}</text>`);
    for (const r of lane.runs) {
      const x0 = x(r.startMs);
      const w = Math.max(((r.ms) / span) * PLOT_W, 0.6);
      parts.push(`<rect class="bar" x="${x0.toFixed(2)}" y="${y + 2}" width="${w.toFixed(2)}" height="${LANE_H - 4}" fill="${batchColor(r.batch)}"><title>${esc(`${lane.label}: +${(r.startMs - s.startMs).toFixed(2)} ms, run ${r.ms.toFixed(2)} ms, batch ${r.batch}`)}</title></rect>`);
    }
    parts.push('</g>');
  });
  return `<section id="run-${index}">
<h2>${esc(s.title)}</h2>${s.subtitle ? `\n<p class="sub">${esc(s.subtitle)}</p>` : ''}
<svg xmlns="http://www.w3.org/2000/svg" width="${LABEL_W + PLOT_W + 10}" height="${height}" viewBox="0 0 ${LABEL_W + PLOT_W + 10} ${height}" font-family="system-ui, sans-serif">
${parts.join('\n')}
</svg>
</section>`;
}

function legend(maxBatch: number): string {
  const items: string[] = [];
  for (let b = 1; b <= Math.min(maxBatch, PALETTE.length); b++) items.push(`<span class="key"><i style="background:${batchColor(b)}"></i>batch ${b}</span>`);
  if (maxBatch > PALETTE.length) items.push(`<span class="key"><i style="background:${OVERFLOW}"></i>batch &gt; ${PALETTE.length}</span>`);
  return `<div class="legend">Bar colour = sessions sharing the ORT run: ${items.join(' ')}</div>`;
}

export function renderTimeline(title: string, sections: TimelineSection[]): string {
  const maxBatch = Math.max(1, ...sections.flatMap((s) => s.lanes.flatMap((l) => l.runs.map((r) => r.batch))));
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>${esc(title)}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 16px; color: #222; }
h1 { font-size: 18px; } h2 { font-size: 15px; margin: 18px 0 2px; } .sub { margin: 0 0 6px; color: #555; font-size: 12px; }
.legend { font-size: 12px; margin: 8px 0; } .key { margin-right: 12px; white-space: nowrap; }
.key i { display: inline-block; width: 12px; height: 12px; margin-right: 4px; vertical-align: -2px; }
</style></head>
<body>
<h1>${esc(title)}</h1>
<p class="sub">One lane per pipeline stage; one bar per ORT run, placed at the worker's start time, as wide as the run took. Gaps are time the stage waited (transport, the coordinator, other stages). Hover a bar for its numbers.</p>
${legend(maxBatch)}
${sections.map(renderSection).join('\n')}
</body></html>
`;
}
