// Numbers and times as the console shows them.

const integer = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
const decimal = new Intl.NumberFormat(undefined, { maximumFractionDigits: 1 });

export function count(value) {
  return value === null || value === undefined ? "–" : integer.format(value);
}

export function rate(value) {
  if (value === null || value === undefined) return "–";
  return value >= 100 ? integer.format(value) : decimal.format(value);
}

export function seconds(value) {
  if (value === null || value === undefined) return "–";
  if (value < 60) return `${decimal.format(value)} s`;
  if (value < 3600) return `${decimal.format(value / 60)} min`;
  return `${decimal.format(value / 3600)} h`;
}

/** "12 s ago" from a Unix time (seconds). */
export function ago(unix, now = Date.now() / 1000) {
  if (unix === null || unix === undefined) return "–";
  const delta = Math.max(0, now - unix);
  if (delta < 1) return "just now";
  return `${seconds(delta)} ago`;
}

/** "in 40 min" from a Unix time (seconds). */
export function until(unix, now = Date.now() / 1000) {
  if (unix === null || unix === undefined) return "now";
  const delta = unix - now;
  return delta <= 0 ? "now" : `in ${seconds(delta)}`;
}

export function clock(unix) {
  if (unix === null || unix === undefined) return "–";
  return new Date(unix * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

export function timestamp(text) {
  if (!text) return "–";
  const date = new Date(text);
  if (Number.isNaN(date.getTime())) return text;
  return date.toLocaleString([], {
    year: "numeric", month: "2-digit", day: "2-digit",
    hour: "2-digit", minute: "2-digit", second: "2-digit",
  });
}

export function words(text) {
  return String(text).replaceAll("_", " ");
}

/** A time to the millisecond: the steps of a pair's history are often within one second. */
export function precise(text) {
  if (!text) return "–";
  const date = new Date(text);
  if (Number.isNaN(date.getTime())) return text;
  return date.toLocaleString([], {
    year: "numeric", month: "2-digit", day: "2-digit",
    hour: "2-digit", minute: "2-digit", second: "2-digit", fractionalSecondDigits: 3,
  });
}
