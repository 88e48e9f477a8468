// Every error pagetwin throws on purpose, in one module with no imports at
// all (so the browser entry exports them too, and its types need no Node
// types). A caller tells them apart by class or by `code` (as Node's and
// undici's are); an error that wraps another keeps it as `cause`.

/**
 * What a MigrationError carries: pagetwin/agent's MigrationResult (the agent
 * module adds its members here, so this module stays free of Node types).
 */
export interface MigrationErrorResult {}

/** What an AgentMigrationError carries: pagetwin/agent's AgentMigrationResult (added there, as above). */
export interface AgentMigrationErrorResult {}

/** Options of every pagetwin error: the error it wraps, if any. */
export interface PagetwinErrorOptions {
  cause?: unknown;
}

/** Base class of every error pagetwin throws on purpose; `code` is stable, the message is for people. */
export class PagetwinError extends Error {
  /** Stable machine-readable code, `PAGETWIN_*` (`ABORT_ERR` for {@link AbortError}, as Node's). */
  readonly code: string = "PAGETWIN_ERROR";

  constructor(message: string, options?: PagetwinErrorOptions) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** Bad options or arguments: nothing was started. */
export class UsageError extends PagetwinError {
  override readonly code: string = "PAGETWIN_USAGE";
}

/** The link's security settings are missing, weak or unreadable: nothing was started. */
export class SecurityError extends UsageError {
  override readonly code: string = "PAGETWIN_SECURITY";
}

/**
 * An operation was cancelled through its `AbortSignal`. Compatible with the
 * AbortError of Node and of `fetch`: name "AbortError", code "ABORT_ERR",
 * `cause` the signal's reason.
 */
export class AbortError extends PagetwinError {
  override readonly code: string = "ABORT_ERR";
}

/** A peer sent something the protocol does not allow (a corrupt or out-of-place frame). */
export class ProtocolError extends PagetwinError {
  override readonly code: string = "PAGETWIN_PROTOCOL";
}

/** The link to the peer closed before the exchange was over. */
export class LinkClosedError extends PagetwinError {
  override readonly code: string = "PAGETWIN_LINK_CLOSED";
}

/** The wasm core could not be loaded (missing or unreadable file, HTTP error, wrong build). */
export class CoreLoadError extends PagetwinError {
  override readonly code: string = "PAGETWIN_CORE_LOAD";
}

/**
 * Hashes, an index or a pool from another Engine (another hash seed) met:
 * nothing would ever match, so this is an error rather than a plan without twins.
 */
export class EngineMismatchError extends UsageError {
  override readonly code: string = "PAGETWIN_ENGINE_MISMATCH";
}

/** A page reader returned a Promise where a synchronous one is needed (use planIterationAsync). */
export class AsyncReaderError extends UsageError {
  override readonly code: string = "PAGETWIN_ASYNC_READER";
}

/** The NAS image or its block index cannot be opened, read or written. */
export class NasError extends PagetwinError {
  override readonly code: string = "PAGETWIN_NAS";
}

/** A guest RAM file cannot be opened, has the wrong size, or ended early. */
export class RamFileError extends PagetwinError {
  override readonly code: string = "PAGETWIN_RAM_FILE";
}

/** A pool worker died (crashed, ran out of memory, was terminated) during a call; the pool replaces it. */
export class PoolWorkerError extends PagetwinError {
  override readonly code: string = "PAGETWIN_POOL_WORKER";
}

/** A call on a pool (or one of its sessions) after close(). */
export class PoolClosedError extends PagetwinError {
  override readonly code: string = "PAGETWIN_POOL_CLOSED";
}

/** QEMU's migration stream holds something stream mode cannot parse. */
export class StreamFormatError extends PagetwinError {
  override readonly code: string = "PAGETWIN_STREAM_FORMAT";
}

/** An agent-mode migration (migrateSource) failed; the source VM was resumed. `result` says how far it got. */
export class MigrationError extends PagetwinError {
  override readonly code: string = "PAGETWIN_MIGRATION";
  constructor(message: string, readonly result: MigrationErrorResult, options?: PagetwinErrorOptions) {
    super(message, options);
  }
}

/** A QEMU agent-mode migration failed; the source VM was left running. `result` says how far it got. */
export class AgentMigrationError extends PagetwinError {
  override readonly code: string = "PAGETWIN_AGENT_MIGRATION";
  constructor(message: string, readonly result: AgentMigrationErrorResult, options?: PagetwinErrorOptions) {
    super(message, options);
  }
}

/** Base class of every error of the QMP client. */
export class QmpError extends PagetwinError {
  override readonly code: string = "PAGETWIN_QMP";
}

/** The peer does not speak QMP (bad greeting, invalid JSON, unexpected message). */
export class QmpProtocolError extends QmpError {
  override readonly code: string = "PAGETWIN_QMP_PROTOCOL";
}

/** QEMU answered a command with `{"error": {...}}`. */
export class QmpCommandError extends QmpError {
  override readonly code: string = "PAGETWIN_QMP_COMMAND";
  constructor(readonly command: string, readonly errorClass: string, readonly desc: string) {
    super(`QMP command '${command}' failed: ${errorClass}: ${desc}`);
  }
}

/** No reply (or greeting, or event) arrived in time. */
export class QmpTimeoutError extends QmpError {
  override readonly code: string = "PAGETWIN_QMP_TIMEOUT";
  constructor(readonly command: string, readonly timeoutMs: number, what = "command") {
    super(`QMP ${what} '${command}' timed out after ${timeoutMs} ms`);
  }
}

/** The connection closed (or failed) before the command was answered. */
export class QmpClosedError extends QmpError {
  override readonly code: string = "PAGETWIN_QMP_CLOSED";
  constructor(readonly command: string | undefined, reason: string) {
    super(command === undefined ? `QMP connection closed: ${reason}` : `QMP command '${command}' aborted: connection closed: ${reason}`);
  }
}

/** A disk image that is not what its header says (bad magic, offsets past its end, corrupt compressed data). */
export class ImageFormatError extends NasError {
  override readonly code: string = "PAGETWIN_IMAGE_FORMAT";
}

/** A disk image using a feature pagetwin does not read (encryption, external data file, ...): `feature` names it. */
export class UnsupportedImageError extends NasError {
  override readonly code: string = "PAGETWIN_IMAGE_UNSUPPORTED";
  constructor(readonly path: string, readonly feature: string, hint = "", options?: PagetwinErrorOptions) {
    super(`pagetwin: ${path} uses ${feature}, which pagetwin does not read${hint ? `; ${hint}` : ""}`, options);
  }
}

/** A block index file that is not one, or of a version or layout this pagetwin does not read. */
export class IndexFormatError extends NasError {
  override readonly code: string = "PAGETWIN_INDEX_FORMAT";
}

/** QEMU's dirty bitmap for a drive could not be added, read or rotated. */
export class DirtyTrackerError extends PagetwinError {
  override readonly code: string = "PAGETWIN_DIRTY_TRACKER";
}

/** An NBD server sent something the NBD protocol does not allow. */
export class NbdProtocolError extends PagetwinError {
  override readonly code: string = "PAGETWIN_NBD_PROTOCOL";
}

/** The NBD server answered a request or an option with an error; `errno` is its NBD error number (0: an option refused). */
export class NbdServerError extends PagetwinError {
  override readonly code: string = "PAGETWIN_NBD_SERVER";
  readonly errno: number;
  constructor(message: string, options: PagetwinErrorOptions & { errno?: number } = {}) {
    super(message, options);
    this.errno = options.errno ?? 0;
  }
}

/** libvirt refused or failed an operation (virsh exited nonzero, a domain is not where it should be); `virshStderr` is what virsh said. */
export class LibvirtError extends PagetwinError {
  override readonly code: string = "PAGETWIN_LIBVIRT";
  readonly virshStderr: string;
  constructor(message: string, options: PagetwinErrorOptions & { virshStderr?: string } = {}) {
    super(message, options);
    this.virshStderr = options.virshStderr ?? "";
  }
}

/** A libvirt migration through pagetwin failed; `sourceState` is the guest's state on the source afterwards (libvirt keeps it there). */
export class LibvirtMigrationError extends LibvirtError {
  override readonly code: string = "PAGETWIN_LIBVIRT_MIGRATION";
  readonly sourceState: string;
  constructor(message: string, options: PagetwinErrorOptions & { virshStderr?: string; sourceState: string }) {
    super(message, options);
    this.sourceState = options.sourceState;
  }
}

/**
 * `pagetwin serve` and its control interface: `code` says what went wrong
 * (`PAGETWIN_SERVE_*`, `PAGETWIN_PEER_*`; docs/SERVE.md lists them). A
 * client gets the service's code back as it was.
 */
export class ServeError extends PagetwinError {
  override readonly code: string;

  constructor(code: string, message: string, options?: PagetwinErrorOptions) {
    super(message, options);
    this.code = code;
  }
}

/** A trace file or trace record that is not pagetwin's trace format (docs/TRACE.md). */
export class TraceFormatError extends PagetwinError {
  override readonly code: string = "PAGETWIN_TRACE";
}
