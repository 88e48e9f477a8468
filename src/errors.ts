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

/** A disk image that is not what its header says (bad magic, offsets past its end, corrupt compressed data). */
export class ImageFormatError extends Error {
  override name = "ImageFormatError";
  readonly code: string = "PAGETWIN_IMAGE_FORMAT";
}

/** A disk image using a feature pagetwin does not read (encryption, external data file, ...): `feature` names it. */
export class UnsupportedImageError extends Error {
  override name = "UnsupportedImageError";
  readonly code: string = "PAGETWIN_IMAGE_UNSUPPORTED";
  constructor(readonly path: string, readonly feature: string, hint = "") {
    super(`pagetwin: ${path} uses ${feature}, which pagetwin does not read${hint ? `; ${hint}` : ""}`);
  }
}
