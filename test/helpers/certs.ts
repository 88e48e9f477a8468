// Throwaway certificates made with openssl, for the tests and bench/channel:
// a CA, two certificates it signed, and a self-signed rogue one.

import { execFileSync } from "node:child_process";
import { mkdtempSync, writeFileSync } from "node:fs";
import { join } from "node:path";

/** A CA, certificates it signed for "dst" and "src" (127.0.0.1, localhost), and a self-signed "rogue" one. */
export function makeCerts(dir: string): Record<"ca" | "dstCert" | "dstKey" | "srcCert" | "srcKey" | "rogueCert" | "rogueKey", string> {
  const run = (...args: string[]) => execFileSync("openssl", args, { cwd: dir, stdio: "ignore" });
  run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=pagetwin test CA");
  for (const who of ["dst", "src", "rogue"]) {
    writeFileSync(join(dir, `${who}.ext`), "subjectAltName=IP:127.0.0.1,DNS:localhost\n");
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", `${who}.key`, "-out", `${who}.csr`, "-subj", `/CN=${who}`);
    if (who === "rogue") run("x509", "-req", "-in", "rogue.csr", "-signkey", "rogue.key", "-out", "rogue.pem", "-days", "1", "-extfile", "rogue.ext");
    else run("x509", "-req", "-in", `${who}.csr`, "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", `${who}.pem`, "-days", "1", "-extfile", `${who}.ext`);
  }
  const p = (f: string) => join(dir, f);
  return { ca: p("ca.pem"), dstCert: p("dst.pem"), dstKey: p("dst.key"), srcCert: p("src.pem"), srcKey: p("src.key"), rogueCert: p("rogue.pem"), rogueKey: p("rogue.key") };
}

let made: ReturnType<typeof makeCerts> | null = null;
/** The test CA and its certificates, made once per test file (openssl takes a second), in a new directory under `parent`. */
export function certsOnce(parent: string): ReturnType<typeof makeCerts> {
  made ??= makeCerts(mkdtempSync(join(parent, "certs-")));
  return made;
}
