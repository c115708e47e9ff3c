// Building the page: every piece of text is a text node (textContent), never HTML. Ids that a
// CRM or a user sent are attacker-controlled; nothing here parses a string as markup.

const FORBIDDEN = new Set(["style", "innerHTML", "outerHTML", "srcdoc"]);

function append(element, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

function apply(element, props) {
  for (const [key, value] of Object.entries(props || {})) {
    if (FORBIDDEN.has(key) || key.startsWith("on") && typeof value !== "function") {
      throw new Error(`h(): ${key} is not allowed`);
    }
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") element.setAttribute("class", value);
    else if (key === "text") element.textContent = String(value);
    else if (key.startsWith("on")) element.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(element.dataset, value);
    else if (key === "value" || key === "checked" || key === "disabled" || key === "hidden") {
      element[key] = value;
    } else element.setAttribute(key, value === true ? "" : String(value));
  }
}

/** An HTML element: h("td", {class: "num"}, "12"). Strings become text nodes. */
export function h(tag, props, ...children) {
  const element = document.createElement(tag);
  apply(element, props);
  append(element, children);
  return element;
}

const SVG = "http://www.w3.org/2000/svg";

/** An SVG element, drawn by the console itself (the overview's charts). */
export function svg(tag, props, ...children) {
  const element = document.createElementNS(SVG, tag);
  apply(element, props);
  append(element, children);
  return element;
}

/** Replace an element's children. */
export function fill(element, ...children) {
  element.replaceChildren();
  append(element, children);
  return element;
}

/** A table whose body the caller fills: its head from `columns` ([label, class]). */
export function table(caption, columns) {
  const body = h("tbody");
  const element = h(
    "table",
    {},
    caption ? h("caption", { class: "visually-hidden" }, caption) : null,
    h("thead", {}, h("tr", {}, columns.map(([label, cls]) => h("th", { scope: "col", class: cls }, label)))),
    body,
  );
  return { element: h("div", { class: "table-wrap" }, element), body };
}

/** A small figure: a label and its value (and an optional note under it). */
export function tile(label, value, note) {
  return h(
    "div",
    { class: "tile" },
    h("div", { class: "tile-label" }, label),
    h("div", { class: "tile-value" }, value),
    note ? h("div", { class: "tile-note" }, note) : null,
  );
}

/** A status message area that screen readers announce. */
export function messageArea(role = "status") {
  return h("p", { class: "message", role, hidden: true });
}

export function say(area, text, kind = "info") {
  area.hidden = !text;
  area.textContent = text || "";
  area.className = `message ${kind}`;
}

/**
 * Let a filled table (from `table()`) stack its rows as cards on a narrow screen: each cell
 * is labelled with its column's heading (style.css shows the label beside the value).
 */
export function stacked(wrap) {
  const element = wrap.querySelector("table");
  element.classList.add("stack");
  const labels = [...element.querySelectorAll("thead th")].map((th) => th.textContent.trim());
  for (const row of element.querySelectorAll("tbody tr")) {
    [...row.children].forEach((cell, index) => {
      if (labels[index]) cell.dataset.label = labels[index];
    });
  }
  return wrap;
}
