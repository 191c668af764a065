// The dashboard's view of the HTTP API: the key, JSON calls, images and downloads that need the
// Authorization header, and server-sent events read through fetch() (EventSource cannot send headers).

const KEY_NAME = "atelier.apiKey";

export const auth = {
  get: () => localStorage.getItem(KEY_NAME),
  set: (key) => localStorage.setItem(KEY_NAME, key.trim()),
  clear: () => localStorage.removeItem(KEY_NAME),
};

export class ApiError extends Error {
  constructor(status, body) {
    super(body.detail || body.title || `HTTP ${status}`);
    this.status = status;
    this.code = body.code || "http_error";
  }
}

function headers(extra = {}) {
  return { Authorization: `Bearer ${auth.get() || ""}`, ...extra };
}

function withParams(path, params) {
  const url = new URL(path, location.origin);
  for (const [name, value] of Object.entries(params || {})) {
    if (value !== null && value !== undefined && value !== "") url.searchParams.set(name, value);
  }
  return url;
}

async function failure(response) {
  let body = {};
  try {
    body = await response.json();
  } catch {
    body = { detail: `${response.status} ${response.statusText}` };
  }
  return new ApiError(response.status, body);
}

/** JSON from the API; throws ApiError (status 401 when the key is wrong). */
export async function api(path, { params, signal, method = "GET" } = {}) {
  const response = await fetch(withParams(path, params), { method, headers: headers(), signal });
  if (!response.ok) throw await failure(response);
  return response.status === 204 ? null : response.json();
}

/** Per-view lifetime: aborts the view's requests and frees its object URLs when the view changes. */
export class Scope {
  constructor() {
    this.controller = new AbortController();
    this.urls = new Map();
    this.timers = [];
  }

  get signal() {
    return this.controller.signal;
  }

  get alive() {
    return !this.controller.signal.aborted;
  }

  every(ms, fn) {
    this.timers.push(setInterval(fn, ms));
  }

  /**
   * A URL an <img> can show. Files served by the API need the key, so they are fetched and shown
   * through an object URL; presigned storage URLs (another origin) carry their own signature.
   */
  async imageURL(url) {
    const absolute = new URL(url, location.origin);
    if (absolute.origin !== location.origin) return absolute.href;
    if (!this.urls.has(absolute.href)) {
      this.urls.set(absolute.href, (async () => {
        const response = await fetch(absolute, { headers: headers(), signal: this.signal });
        if (!response.ok) throw await failure(response);
        return URL.createObjectURL(await response.blob());
      })());
    }
    return this.urls.get(absolute.href);
  }

  dispose() {
    this.controller.abort();
    for (const timer of this.timers) clearInterval(timer);
    for (const pending of this.urls.values()) {
      pending.then((url) => url.startsWith("blob:") && URL.revokeObjectURL(url), () => {});
    }
  }
}

/** Sets `img.src` once the image is fetched; marks the image failed (class) if it cannot be. */
export async function showImage(scope, img, url) {
  try {
    img.src = await scope.imageURL(url);
  } catch (error) {
    if (!scope.alive) return;
    img.classList.add("broken");
    img.alt = `could not load: ${error.message}`;
  }
}

/**
 * Downloads an artifact file. The API streams it (local storage) or redirects to a presigned URL
 * (S3): then the browser is sent to that URL itself, so a multi-GB checkpoint never sits in memory.
 */
export async function download(path, params, filename) {
  const controller = new AbortController();
  const response = await fetch(withParams(path, params), { headers: headers(), signal: controller.signal });
  if (!response.ok) throw await failure(response);
  const link = document.createElement("a");
  let objectURL = null;
  if (new URL(response.url).origin !== location.origin) {
    controller.abort();
    link.href = response.url;
  } else {
    objectURL = URL.createObjectURL(await response.blob());
    link.href = objectURL;
    link.download = filename;
  }
  document.body.append(link);
  link.click();
  link.remove();
  if (objectURL) setTimeout(() => URL.revokeObjectURL(objectURL), 60_000);
}

/** Server-sent events as {id, event, data} objects until the server ends the stream. */
export async function* events(path, params, signal) {
  const response = await fetch(withParams(path, params), {
    headers: headers({ Accept: "text/event-stream" }),
    signal,
  });
  if (!response.ok) throw await failure(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const message = parseEvent(buffer.slice(0, end));
      buffer = buffer.slice(end + 2);
      if (message) yield message;
    }
  }
}

function parseEvent(block) {
  const message = { id: null, event: "message", data: "" };
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "data") data.push(value);
    else if (field === "event") message.event = value;
    else if (field === "id") message.id = value;
  }
  if (!data.length) return null;
  message.data = data.join("\n");
  return message;
}
