import { dirname } from 'node:path';
import { parseDevice, StageSession, stagePrepack, type SessionOptions } from './executor.ts';
import { abandonImage, discardImage, finishImage, imageDir, imageWrite, packedImageUsed, readyImage } from './packed-image.ts';

/**
 * Opens a stage graph's ORT session, prepacking as stagePrepack says for its dtype; quantized CPU stages through their
 * packed image (model/packed-image.ts): the image when this host has a finished one, else the stage graph, writing
 * the image while ORT loads it. `prefetch` starts reading the graph's weights as ORT opens them (worker/stage-thread.ts);
 * the session is returned once that read has ended too.
 * Any failure of the image falls back to the stage graph: the image only ever saves time.
 */
export async function openStageSession(
  graph: string,
  dtype: string,
  opts: SessionOptions,
  log: (m: string) => void = () => {},
  prefetch: (graph: string) => Promise<unknown> | void = () => {},
): Promise<StageSession> {
  opts = { prepack: stagePrepack(dtype), ...opts };
  /** ORT's load of `path` with the prefetch of it under way alongside. */
  const create = async (path: string, o: SessionOptions): Promise<StageSession> => {
    const read = prefetch(path);
    const session = await StageSession.create(path, o);
    await read;
    return session;
  };
  if (!packedImageUsed(dtype, parseDevice(opts.device).kind)) return create(graph, opts);
  const image = readyImage(graph);
  if (image) {
    try {
      const session = await create(image, opts);
      log(`stage loaded from its packed image: ${dirname(image)}`);
      return session;
    } catch (e) {
      log(`packed image ${dirname(image)} did not load (${(e as Error).message.split('\n')[0]}): loading the stage graph and writing the image again`);
      discardImage(graph);
    }
  }
  const write = imageWrite(graph);
  let session: StageSession;
  try {
    session = await create(graph, { ...opts, image: write });
  } catch (e) {
    // Writing the image must never cost the load (a full disk, say): once more without it. A graph that does not
    // load fails again here, as it would have without images.
    abandonImage(write);
    log(`packed image not written (${(e as Error).message.split('\n')[0]}): loading the stage graph without it`);
    return StageSession.create(graph, opts);
  }
  try {
    const t0 = performance.now();
    const moved = finishImage(write);
    log(`packed image written for the next start: ${imageDir(graph)} (${(moved / 2 ** 20).toFixed(0)} MiB realigned, ${((performance.now() - t0) / 1000).toFixed(1)} s)`);
  } catch (e) {
    abandonImage(write);
    log(`packed image not written (${(e as Error).message.split('\n')[0]}): the next start loads the stage graph again`);
  }
  return session;
}
