// `npm run test:chaos`: 100 requests through a 3-stage pipeline (+1 spare) while workers are killed and restarted.
import { fileURLToPath } from 'node:url';
import { runChaos } from './chaos.ts';

const report = await runChaos({
  modelDir: fileURLToPath(new URL('../fixtures/gptj-tiny', import.meta.url)),
  requests: Number(process.env.CHAOS_REQUESTS ?? 100), concurrency: 8, newTokens: 24, stages: 3, spares: 1,
  killEveryMs: Number(process.env.CHAOS_KILL_EVERY_MS ?? 1500), log: (m) => console.error(m),
});
console.log(JSON.stringify(report, null, 2));
if (report.lost || report.wrong) process.exit(1);
