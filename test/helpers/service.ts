import { pino } from 'pino';
import { LocalPipeline } from '../../model/local-pipeline.ts';
import type { StrataTokenizer } from '../../model/tokenizer.ts';
import { startCoordinatorService, type CoordinatorService, type CoordinatorServiceOptions } from '../../coordinator/service.ts';
import { fixtureDir, testCacheDir } from './fixtures.ts';
import { redisUrlForTests, uniqueQueueName } from './redis.ts';
import { byteLevelTokenizer } from './byte-tokenizer.ts';

export interface Gpt2Service {
  svc: CoordinatorService;
  gpt2: LocalPipeline;
  tokenizer: StrataTokenizer;
  redis: { url: string; stop: () => Promise<void> };
  /** Empties the test queue, stops the service, the pipeline and any private Redis. */
  close(): Promise<void>;
}

/**
 * A real coordinator service for API tests: LocalPipeline on gpt2-tiny (2 stages), a byte-level tokenizer, real
 * Redis + BullMQ on a queue of its own.
 */
export async function startGpt2Service(name: string, extra: Partial<CoordinatorServiceOptions> = {}): Promise<Gpt2Service> {
  testCacheDir();
  const redis = await redisUrlForTests();
  const gpt2 = await LocalPipeline.load(fixtureDir('gpt2-tiny'), 2);
  const tokenizer = await byteLevelTokenizer(gpt2.spec);
  const svc = await startCoordinatorService({
    redisUrl: redis.url, prefix: `strata-test-${name}`, queueName: uniqueQueueName(name), host: '127.0.0.1', port: 0, log: pino({ level: 'silent' }),
    tokenizer, pipeline: gpt2, spec: gpt2.spec, modelName: 'gpt2-tiny',
    pipelineInfo: () => ({ stages: [{ blocks: [0, 4], address: 'in-process', healthy: true }] }),
    ...extra,
  });
  return {
    svc, gpt2, tokenizer, redis,
    close: async () => {
      await svc.queue.queue.obliterate({ force: true });
      await svc.close();
      await gpt2.close();
      await redis.stop();
    },
  };
}
