// The console's shell: sign-in, navigation between views, sign-out.

import { call, forget, onUnauthorized, remember, token, Unauthorized } from "./api.js";
import * as overview from "./views/overview.js";
import * as contact from "./views/contact.js";
import * as deadLetters from "./views/dead-letters.js";
import * as segments from "./views/segments.js";
import * as reconcile from "./views/reconcile.js";
import * as cluster from "./views/cluster.js";

const VIEWS = {
  overview: { module: overview, title: "Overview" },
  contact: { module: contact, title: "Contact" },
  "dead-letters": { module: deadLetters, title: "Dead letters" },
  segments: { module: segments, title: "Segments" },
  reconcile: { module: reconcile, title: "Reconcile" },
  cluster: { module: cluster, title: "Cluster" },
};

const signIn = document.getElementById("sign-in");
const form = document.getElementById("sign-in-form");
const field = document.getElementById("admin-token");
const signInError = document.getElementById("sign-in-error");
const nav = document.getElementById("nav");
const signOutButton = document.getElementById("sign-out");
const viewRoot = document.getElementById("view");

let mounted = null;

function route() {
  // "#contact/1234" opens the Contact view on that id.
  const hash = location.hash.replace(/^#/, "");
  const [name, ...rest] = hash.split("/");
  let argument = rest.join("/");
  try {
    argument = decodeURIComponent(argument);
  } catch {
    // A hand-edited hash that is no valid percent-encoding: taken as it is.
  }
  return { name: VIEWS[name] ? name : "overview", argument };
}

function showSignIn(message) {
  if (mounted) {
    mounted.unmount();
    mounted = null;
  }
  viewRoot.hidden = true;
  viewRoot.replaceChildren();
  nav.hidden = true;
  signOutButton.hidden = true;
  signIn.hidden = false;
  signInError.hidden = !message;
  signInError.textContent = message || "";
  document.title = "Sign in · segmapd console";
  field.value = "";
  field.focus();
}

function showView() {
  const { name, argument } = route();
  if (mounted) mounted.unmount();
  signIn.hidden = true;
  nav.hidden = false;
  signOutButton.hidden = false;
  viewRoot.hidden = false;
  for (const link of nav.querySelectorAll("a")) {
    if (link.dataset.view === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const view = VIEWS[name];
  document.title = `${view.title} · segmapd console`;
  viewRoot.replaceChildren();
  mounted = view.module.mount(viewRoot, { argument });
}

function signOut(message) {
  forget();
  showSignIn(message);
}

// The form submits only through this handler: until it is attached the button stays disabled,
// so that a token is never sent as a query string by the browser's own form submission.
form.querySelector("button[type=submit]").disabled = false;
form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const value = field.value.trim();
  if (!value) {
    showSignIn("Enter an admin token.");
    return;
  }
  remember(value);
  try {
    // Any admin call checks the token; the overview is the first view anyway.
    await call("v1/overview?since=9999999999");
  } catch (error) {
    forget();
    showSignIn(
      error instanceof Unauthorized
        ? "That admin token was not accepted. Check server.admin_tokens and try again."
        : `Could not sign in: ${error.message}`,
    );
    return;
  }
  signInError.hidden = true;
  if (!location.hash) location.hash = "#overview";
  showView();
});

signOutButton.addEventListener("click", () => signOut(""));

onUnauthorized(() => signOut("The admin token is no longer accepted. Sign in again."));

window.addEventListener("hashchange", () => {
  if (token()) showView();
});

if (token()) showView();
else showSignIn("");
