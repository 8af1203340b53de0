/**
 * A small, offline kustomize for deploy/k8s: renders a kustomization directory the way `kubectl kustomize` does,
 * for the subset of kustomize the strata manifests use, and refuses everything else (so it can never silently
 * render something different from the real tool):
 *
 *   resources   files (multi-document YAML) and directories holding a kustomization.yaml
 *   namespace   set on every namespaced object (a Namespace object must already carry that name)
 *   images      name -> newName / newTag / digest, on every container and initContainer image
 *   patches     `- path: FILE` strategic-merge patches, matched by kind + metadata.name (+ namespace if given):
 *               maps merge, `key: null` deletes, lists with a Kubernetes patch merge key (containers, env,
 *               volumes, volumeMounts, ports, …) merge item by item (the patch's items first, then the base's
 *               other items, as kustomize orders them), other lists are replaced, and
 *               `$patch: delete` at the top of a patch deletes the object.
 *
 * YAML is read as YAML 1.1, as kubectl reads it (0440 is octal; yes/no are booleans).
 * Usage: node --import tsx deploy/render.ts deploy/k8s/overlays/gpu   (prints the rendered YAML)
 */
import { existsSync, readFileSync, statSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { parseAllDocuments, stringify } from 'yaml';

export type Json = null | boolean | number | string | Json[] | { [k: string]: Json };
export type JsonObject = { [k: string]: Json };
export interface K8sObject extends JsonObject {
  apiVersion: string;
  kind: string;
  metadata: JsonObject & { name: string; namespace?: string };
}

const SUPPORTED = new Set(['apiVersion', 'kind', 'namespace', 'resources', 'images', 'patches']);

/** Kinds that live outside namespaces (the ones these manifests could plausibly contain). */
const CLUSTER_SCOPED = new Set([
  'Namespace', 'PersistentVolume', 'StorageClass', 'ClusterRole', 'ClusterRoleBinding', 'CustomResourceDefinition',
  'PriorityClass', 'RuntimeClass', 'IngressClass', 'ValidatingWebhookConfiguration', 'MutatingWebhookConfiguration',
]);

/** Kubernetes' patchMergeKey for the list fields these manifests can patch (from the API types' struct tags). */
const MERGE_KEYS: Record<string, string> = {
  containers: 'name',
  initContainers: 'name',
  ephemeralContainers: 'name',
  env: 'name',
  volumes: 'name',
  volumeMounts: 'mountPath',
  volumeDevices: 'devicePath',
  imagePullSecrets: 'name',
  hostAliases: 'ip',
  topologySpreadConstraints: 'topologyKey',
  resourceClaims: 'name',
};

export const isObject = (v: unknown): v is JsonObject => typeof v === 'object' && v !== null && !Array.isArray(v);

/** Every document of a YAML file, parsed as YAML 1.1 (kubectl's dialect); empty documents are dropped. */
export function readYamlDocuments(file: string): Json[] {
  const docs = parseAllDocuments(readFileSync(file, 'utf8'), { version: '1.1', merge: true, prettyErrors: true });
  return docs.map((d) => {
    if (d.errors.length) throw new Error(`${file}: ${d.errors.map((e) => e.message).join('; ')}`);
    return d.toJS({ maxAliasCount: 100 }) as Json;
  }).filter((d) => d !== null && d !== undefined);
}

function asObject(doc: Json, where: string): K8sObject {
  if (!isObject(doc) || typeof doc.apiVersion !== 'string' || typeof doc.kind !== 'string' || !isObject(doc.metadata) || typeof doc.metadata.name !== 'string') {
    throw new Error(`${where}: not a Kubernetes object (apiVersion, kind and metadata.name are required)`);
  }
  return doc as K8sObject;
}

export const objectId = (o: K8sObject): string => `${o.kind}/${o.metadata.namespace ? `${o.metadata.namespace}/` : ''}${o.metadata.name}`;

function mergeKeyFor(field: string, items: Json[]): string | undefined {
  if (field === 'ports') return items.some((p) => isObject(p) && 'containerPort' in p) ? 'containerPort' : 'port';
  return MERGE_KEYS[field];
}

function stripDirectives(v: Json): Json {
  if (Array.isArray(v)) return v.map(stripDirectives);
  if (!isObject(v)) return v;
  const out: JsonObject = {};
  for (const [k, x] of Object.entries(v)) {
    if (k.startsWith('$')) throw new Error(`unsupported patch directive ${k}`);
    if (x !== null) out[k] = stripDirectives(x);
  }
  return out;
}

/** Strategic merge of `patch` into `base` (neither is modified). `field` names the list being merged. */
export function strategicMerge(base: Json | undefined, patch: Json, field = ''): Json {
  if (isObject(patch)) {
    if (!isObject(base)) return stripDirectives(patch);
    const out: JsonObject = { ...base };
    for (const [k, v] of Object.entries(patch)) {
      if (k.startsWith('$')) throw new Error(`unsupported patch directive ${k} (only a top-level "$patch: delete" is supported)`);
      if (v === null) delete out[k];
      else out[k] = strategicMerge(base[k], v, k);
    }
    return out;
  }
  if (Array.isArray(patch)) {
    const key = mergeKeyFor(field, patch);
    if (!key || !Array.isArray(base) || !patch.every(isObject)) return stripDirectives(patch);
    // kustomize's order: the patch's items first (in patch order, merged with their base items), then the base
    // items the patch does not name (in base order).
    const named = new Set<Json>();
    const out: Json[] = [];
    for (const item of patch as JsonObject[]) {
      if (item[key] === undefined) throw new Error(`patch item of ${field} has no ${key}`);
      named.add(item[key]);
      const match = base.find((b) => isObject(b) && b[key] === item[key]);
      out.push(match === undefined ? stripDirectives(item) : strategicMerge(match, item, field));
    }
    return [...out, ...base.filter((b) => !(isObject(b) && named.has(b[key])))];
  }
  return patch;
}

function setImages(node: Json, images: JsonObject[]): void {
  if (Array.isArray(node)) return node.forEach((n) => setImages(n, images));
  if (!isObject(node)) return;
  for (const [k, v] of Object.entries(node)) {
    if ((k === 'containers' || k === 'initContainers') && Array.isArray(v)) {
      for (const c of v) {
        if (!isObject(c) || typeof c.image !== 'string') continue;
        const m = /^(?<name>[^@]+?)(?::(?<tag>[\w][\w.-]{0,127}))?(?:@(?<digest>.+))?$/.exec(c.image);
        if (!m?.groups) continue;
        const rule = images.find((i) => i.name === m.groups!.name);
        if (!rule) continue;
        const name = (rule.newName as string | undefined) ?? m.groups.name;
        if (rule.digest) c.image = `${name}@${rule.digest}`;
        else {
          const tag = (rule.newTag as string | undefined) ?? m.groups.tag;
          c.image = `${name}${tag ? `:${tag}` : ''}${!rule.newTag && m.groups.digest ? `@${m.groups.digest}` : ''}`;
        }
      }
    } else setImages(v, images);
  }
}

/** Renders the kustomization in `dir` (base resources first, then this level's patches, namespace, images). */
export function renderKustomization(dir: string): K8sObject[] {
  const file = ['kustomization.yaml', 'kustomization.yml', 'Kustomization'].map((f) => join(dir, f)).find((f) => existsSync(f));
  if (!file) throw new Error(`${dir}: no kustomization.yaml`);
  const [k] = readYamlDocuments(file);
  if (!isObject(k)) throw new Error(`${file}: empty`);
  for (const key of Object.keys(k)) if (!SUPPORTED.has(key)) throw new Error(`${file}: "${key}" is not supported by deploy/render.ts (keep to ${[...SUPPORTED].join(', ')})`);

  let objects: K8sObject[] = [];
  for (const r of (k.resources ?? []) as string[]) {
    const path = resolve(dir, r);
    if (statSync(path).isDirectory()) objects.push(...renderKustomization(path));
    else objects.push(...readYamlDocuments(path).map((d, i) => asObject(d, `${path}#${i}`)));
  }

  for (const p of (k.patches ?? []) as JsonObject[]) {
    if (!isObject(p) || typeof p.path !== 'string' || Object.keys(p).length !== 1) {
      throw new Error(`${file}: only "- path: FILE" strategic-merge patches are supported, got ${JSON.stringify(p)}`);
    }
    const patchFile = resolve(dir, p.path);
    for (const [i, doc] of readYamlDocuments(patchFile).entries()) {
      const patch = doc as JsonObject;
      const where = `${patchFile}#${i}`;
      const meta = patch.metadata as JsonObject | undefined;
      if (typeof patch.kind !== 'string' || !isObject(meta) || typeof meta.name !== 'string') throw new Error(`${where}: a patch needs kind and metadata.name`);
      const matches = objects.filter((o) => o.kind === patch.kind && o.metadata.name === meta.name && (!meta.namespace || o.metadata.namespace === meta.namespace) && (!patch.apiVersion || o.apiVersion === patch.apiVersion));
      if (matches.length !== 1) throw new Error(`${where}: patch target ${patch.kind}/${meta.name} matches ${matches.length} objects`);
      const target = matches[0];
      if (patch.$patch === 'delete') {
        objects = objects.filter((o) => o !== target);
        continue;
      }
      const { $patch: _ignored, ...rest } = patch;
      if (_ignored !== undefined) throw new Error(`${where}: unsupported $patch: ${_ignored}`);
      objects[objects.indexOf(target)] = strategicMerge(target, rest) as K8sObject;
    }
  }

  if (typeof k.namespace === 'string') {
    const ns = k.namespace;
    objects = objects.map((o) => {
      if (o.kind === 'Namespace') {
        if (o.metadata.name !== ns) throw new Error(`${file}: Namespace ${o.metadata.name} differs from namespace: ${ns}`);
        return o;
      }
      return CLUSTER_SCOPED.has(o.kind) ? o : { ...o, metadata: { ...o.metadata, namespace: ns } };
    });
  }

  if (Array.isArray(k.images)) {
    objects = structuredClone(objects);
    setImages(objects as unknown as Json, k.images as JsonObject[]);
  }

  const seen = new Set<string>();
  for (const o of objects) {
    const id = `${o.apiVersion}/${objectId(o)}`;
    if (seen.has(id)) throw new Error(`${dir}: ${id} is defined twice`);
    seen.add(id);
  }
  return objects;
}

if (process.argv[1] && import.meta.url === pathToFileURL(resolve(process.argv[1])).href) {
  const dir = process.argv[2];
  if (!dir) {
    process.stderr.write('usage: node --import tsx deploy/render.ts DIR\n');
    process.exit(2);
  }
  process.stdout.write(renderKustomization(dir).map((o) => stringify(o)).join('---\n'));
}
