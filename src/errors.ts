// Errors a caller can tell apart by `code` (as Node's and undici's are).

/** Bad options or arguments: nothing was started. */
export class UsageError extends Error {
  override name = "UsageError";
  readonly code: string = "PAGETWIN_USAGE";
}

/** The link's security settings are missing, weak or unreadable: nothing was started. */
export class SecurityError extends UsageError {
  override name = "SecurityError";
  override readonly code: string = "PAGETWIN_SECURITY";
}
