import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { loadModelSpec } from '../model/config.ts';
import { Checkpoint } from '../model/safetensors.ts';
import { forwardLogits } from '../model/generation.ts';
import { StageClient } from '../transport/grpc/client.ts';
import { loadCredentials } from '../transport/grpc/tls.ts';
import { RemotePipeline } from '../coordinator/remote-pipeline.ts';
import { startWorkerProcess, type LocalWorker } from '../bin/local-cluster.ts';
import { expected, fixtureDir, maxAbsDiff, testCacheDir } from './helpers/fixtures.ts';

const STRATA = fileURLToPath(new URL('../bin/strata.js', import.meta.url));
before(() => testCacheDir());

function makeCerts(): { cert: string; key: string; ca: string } {
  const out = mkdtempSync(join(tmpdir(), 'strata-certs-'));
  execFileSync(process.execPath, [STRATA, 'certs', '--out', out, '--hosts', 'localhost,127.0.0.1']);
  return { cert: join(out, 'node.pem'), key: join(out, 'node-key.pem'), ca: join(out, 'ca.pem') };
}

describe('mutual TLS between coordinator and workers', () => {
  const dir = fixtureDir('gpt2-tiny');
  let files: { cert: string; key: string; ca: string };
  let workers: LocalWorker[] = [];
  before(async () => {
    files = makeCerts();
    const tls = ['--tls-cert', files.cert, '--tls-key', files.key, '--tls-ca', files.ca, '--threads', '1'];
    workers = await Promise.all([startWorkerProcess(dir, tls), startWorkerProcess(dir, tls)]);
  });
  after(() => workers.forEach((w) => w.process.kill()));

  test('a pipeline with the CA\'s certificates computes the same logits', async () => {
    const creds = loadCredentials(files)!;
    const p = await RemotePipeline.connect(workers.map((w) => w.address), { spec: loadModelSpec(dir), fingerprint: Checkpoint.open(dir).fingerprint(), credentials: creds.client });
    const c = expected('gpt2-tiny').forward[1];
    assert.ok(maxAbsDiff(await forwardLogits(p, c.input_ids), c.logits) <= 1e-4);
    p.close();
  });

  test('a worker refuses peers without a certificate from its CA', async () => {
    const plain = new StageClient(workers[0].address);
    await assert.rejects(plain.info(3_000), (e: Error & { kind?: string }) => e.kind === 'unavailable');
    plain.close();
    const other = loadCredentials(makeCerts())!; // a different dev CA
    const stranger = new StageClient(workers[0].address, other.client);
    await assert.rejects(stranger.info(3_000));
    stranger.close();
    const friend = new StageClient(workers[0].address, loadCredentials(files)!.client);
    assert.equal((await friend.info()).identity.blocks, 4);
    friend.close();
  });

  test('half-configured TLS is refused at start-up', () => {
    const r = spawnSync(process.execPath, [STRATA, 'worker', '--listen', '127.0.0.1:0', '--model', dir, '--tls-cert', files.cert], { encoding: 'utf8' });
    assert.equal(r.status, 2);
    assert.match(r.stderr, /--tls-cert, --tls-key and --tls-ca together/);
  });
});
