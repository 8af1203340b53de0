import type { Command } from 'commander';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { generateKeyPairSync } from 'node:crypto';
import forge from 'node-forge';

const { pki } = forge;

function issue(subjectCN: string, issuer: { cert: forge.pki.Certificate; key: forge.pki.rsa.PrivateKey } | null, hosts: string[], days: number) {
  // Node's native key generation: forge's pure-JS RSA takes seconds per key.
  const pair = generateKeyPairSync('rsa', { modulusLength: 2048, publicKeyEncoding: { type: 'spki', format: 'pem' }, privateKeyEncoding: { type: 'pkcs8', format: 'pem' } });
  const keys = { publicKey: pki.publicKeyFromPem(pair.publicKey), privateKey: pki.privateKeyFromPem(pair.privateKey) as forge.pki.rsa.PrivateKey };
  const cert = pki.createCertificate();
  cert.publicKey = keys.publicKey;
  cert.serialNumber = forge.util.bytesToHex(forge.random.getBytesSync(16)).replace(/^[89a-f]/, '1');
  cert.validity.notBefore = new Date(Date.now() - 60_000);
  cert.validity.notAfter = new Date(Date.now() + days * 86_400_000);
  cert.setSubject([{ name: 'commonName', value: subjectCN }, { name: 'organizationName', value: 'strata dev' }]);
  cert.setIssuer(issuer ? issuer.cert.subject.attributes : cert.subject.attributes);
  const isCa = !issuer;
  cert.setExtensions([
    { name: 'basicConstraints', cA: isCa },
    { name: 'keyUsage', keyCertSign: isCa, digitalSignature: true, keyEncipherment: !isCa },
    ...(isCa ? [] : [{ name: 'extKeyUsage', serverAuth: true, clientAuth: true }, { name: 'subjectAltName', altNames: hosts.map((h) => (/^[\d.]+$/.test(h) ? { type: 7, ip: h } : { type: 2, value: h })) }]),
  ]);
  cert.sign(issuer?.key ?? keys.privateKey, forge.md.sha256.create());
  return { cert, key: keys.privateKey };
}

/** `strata certs`: a development CA and one certificate (server + client auth) for every node of a cluster. */
export function registerCertsCommand(program: Command): void {
  program
    .command('certs')
    .description('make a development CA and a node certificate for mutual TLS between coordinator and workers')
    .option('--out <dir>', 'directory to write ca.pem, node.pem, node-key.pem', 'certs')
    .option('--hosts <names>', 'DNS names / IPs the node certificate is valid for', 'localhost,127.0.0.1')
    .option('--days <n>', 'validity', '365')
    .action((o) => {
      const hosts = String(o.hosts).split(',').map((h: string) => h.trim()).filter(Boolean);
      const ca = issue('strata dev CA', null, [], Number(o.days));
      const node = issue(hosts[0] ?? 'strata-node', ca, hosts, Number(o.days));
      mkdirSync(o.out, { recursive: true });
      writeFileSync(join(o.out, 'ca.pem'), pki.certificateToPem(ca.cert));
      writeFileSync(join(o.out, 'node.pem'), pki.certificateToPem(node.cert));
      writeFileSync(join(o.out, 'node-key.pem'), pki.privateKeyToPem(node.key), { mode: 0o600 });
      console.log(`wrote ${o.out}/ca.pem, node.pem, node-key.pem (valid for ${hosts.join(', ')}); the CA key is not kept: re-run to rotate.\n` +
        `use: --tls-cert ${o.out}/node.pem --tls-key ${o.out}/node-key.pem --tls-ca ${o.out}/ca.pem on every worker and coordinator`);
    });
}
