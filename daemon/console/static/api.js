// The admin API, as the console calls it: the bearer token from sessionStorage, no cookies.
// Paths are relative to /ui/, so a segmapd behind a path prefix works too.

const TOKEN_KEY = "segmapd.adminToken";

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function remember(value) {
  sessionStorage.setItem(TOKEN_KEY, value);
}

export function forget() {
  sessionStorage.removeItem(TOKEN_KEY);
}

export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

/** The token was refused: the console signs out and says so. */
export class Unauthorized extends ApiError {}

const listeners = new Set();

/** Call `handler` whenever a request comes back 401. */
export function onUnauthorized(handler) {
  listeners.add(handler);
}

/**
 * Call the API: `path` like "v1/overview". Resolves to the parsed JSON body for any status in
 * `accept` (default: 2xx); else throws ApiError (Unauthorized for 401).
 */
export async function call(path, { method = "GET", body, accept, auth = true, signal } = {}) {
  const headers = { Accept: "application/json" };
  if (auth) headers.Authorization = `Bearer ${token() || ""}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(`../${path}`, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
      credentials: "omit",
      referrerPolicy: "no-referrer",
      signal,
    });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "segmapd did not answer (is it running?)", null);
  }
  let parsed = null;
  const type = response.headers.get("Content-Type") || "";
  if (type.includes("json")) {
    try {
      parsed = await response.json();
    } catch {
      parsed = null;
    }
  }
  if (response.ok || (accept && accept.includes(response.status))) {
    return { status: response.status, body: parsed };
  }
  const message = (parsed && parsed.message) || `${response.status} ${response.statusText}`;
  if (response.status === 401 && auth) {
    const error = new Unauthorized(401, message, parsed);
    for (const handler of listeners) handler(error);
    throw error;
  }
  throw new ApiError(response.status, message, parsed);
}

/** Percent-encoded for a path segment: any id works, `/`, `.` and `..` included. */
export function segment(id) {
  const encoded = encodeURIComponent(id);
  return encoded === "." ? "%2E" : encoded === ".." ? "%2E%2E" : encoded;
}
