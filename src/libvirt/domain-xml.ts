// The disks of a libvirt domain, read from its XML (`virsh dumpxml`): which
// images pagetwin indexes for the migration. Only the few elements needed are
// read, with libvirt's own attribute quoting; no XML library.

/** One `<disk>` of a domain. */
export interface DomainDisk {
  /** The guest's device name (`<target dev>`): vda, sdb, ... */
  target: string;
  /** `<disk type>`: file, block, network, volume, ... */
  type: string;
  /** `<disk device>`: disk, cdrom, floppy, lun. */
  device: string;
  /** The host path of a file or block source (`<source file|dev>`), else undefined. */
  source?: string;
  /** `<driver type>`: raw, qcow2, ... (undefined when the XML names none). */
  format?: string;
  readonly: boolean;
  shareable: boolean;
}

const XML_ENTITIES: Record<string, string> = { amp: "&", lt: "<", gt: ">", quot: '"', apos: "'" };

/** Text of an attribute value: the five named entities and numeric references. */
export function unescapeXml(s: string): string {
  return s.replace(/&(#x[0-9a-f]+|#\d+|amp|lt|gt|quot|apos);/gi, (_, e: string) => {
    if (e[0] === "#") return String.fromCodePoint(e[1] === "x" || e[1] === "X" ? parseInt(e.slice(2), 16) : Number(e.slice(1)));
    return XML_ENTITIES[e.toLowerCase()]!;
  });
}

/** The attributes of the first `<tag ...>` in `xml` (undefined if there is none). */
function attrsOf(xml: string, tag: string): Record<string, string> | undefined {
  const m = new RegExp(`<${tag}(\\s[^>]*?)?/?>`).exec(xml);
  if (!m) return undefined;
  const out: Record<string, string> = {};
  for (const a of (m[1] ?? "").matchAll(/([\w:-]+)\s*=\s*(?:'([^']*)'|"([^"]*)")/g)) out[a[1]!] = unescapeXml(a[2] ?? a[3] ?? "");
  return out;
}

/** The `<disk>` elements of the domain's `<devices>`, in order. */
export function domainDisks(domainXml: string): DomainDisk[] {
  const disks: DomainDisk[] = [];
  for (const m of domainXml.matchAll(/<disk(\s[^>]*)?>([\s\S]*?)<\/disk>/g)) {
    const whole = m[0];
    const disk = attrsOf(whole, "disk") ?? {};
    const inner = m[2] ?? "";
    // A <backingStore> (nested for a chain) holds a <source> of its own: read the disk's, without them.
    const own = inner.replace(/<backingStore[\s>][\s\S]*<\/backingStore>/, "");
    const source = attrsOf(own, "source");
    const path = source?.["file"] ?? source?.["dev"];
    disks.push({
      target: attrsOf(inner, "target")?.["dev"] ?? "",
      type: disk["type"] ?? "file",
      device: disk["device"] ?? "disk",
      ...(path !== undefined ? { source: path } : {}),
      ...(attrsOf(own, "driver")?.["type"] !== undefined ? { format: attrsOf(own, "driver")!["type"] } : {}),
      readonly: /<readonly\s*\/>/.test(own),
      shareable: /<shareable\s*\/>/.test(own),
    });
  }
  return disks;
}

/** The domain's `<uuid>` (undefined if the XML has none). */
export function domainUuid(domainXml: string): string | undefined {
  return /<uuid>\s*([^<\s]+)\s*<\/uuid>/.exec(domainXml)?.[1];
}

/**
 * The disks pagetwin can take twins from: local paths of disks (not CD-ROMs),
 * raw or qcow2 images the destination reaches under the same path (shared storage).
 * The others are listed in `skipped` with the reason.
 */
export function twinDisks(disks: DomainDisk[]): { usable: DomainDisk[]; skipped: { target: string; reason: string }[] } {
  const usable: DomainDisk[] = [];
  const skipped: { target: string; reason: string }[] = [];
  for (const d of disks) {
    const reason = d.device !== "disk" ? `a ${d.device}`
      : d.source === undefined ? `a ${d.type} disk without a local path`
        : d.type !== "file" && d.type !== "block" ? `a ${d.type} disk`
          : d.format !== undefined && d.format !== "raw" && d.format !== "qcow2" ? `format ${d.format}` : "";
    if (reason) skipped.push({ target: d.target, reason });
    else usable.push(d);
  }
  return { usable, skipped };
}
