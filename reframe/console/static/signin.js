// Sign-in: check the key with GET /v1/me, keep it in sessionStorage, go where the operator was.
import { api, ApiError, keyFromFragment, prefix, remember } from "./common.js";

const form = document.getElementById("signin-form");
const input = document.getElementById("api-key");
const error = document.getElementById("signin-error");

function destination() {
  const next = new URLSearchParams(location.search).get("next") || "";
  // only a path of this console, never another origin
  return next.startsWith(`${prefix}/`) && !next.startsWith("//") ? next : `${prefix}/jobs`;
}

async function signIn(key) {
  error.textContent = "";
  try {
    const me = await api("/v1/me", { key });
    remember(key, me);
    location.assign(destination());
  } catch (err) {
    error.textContent = err instanceof ApiError && err.status === 401
      ? "This API key is unknown or revoked."
      : err instanceof ApiError && err.status === 403
        ? "This API key has neither the read nor the admin scope."
        : `Sign-in failed: ${err.message}`;
    input.focus();
  }
}

form.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const key = input.value.trim();
  if (!key) { error.textContent = "Enter an API key."; input.focus(); return; }
  signIn(key);
});

const fromLink = keyFromFragment();
if (fromLink) signIn(fromLink); else input.focus();
