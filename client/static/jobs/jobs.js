/*
 * DenseCap bulk jobs page: the browser twin of `densecap submit` (REST API: docs/jobs-api.md).
 *
 * Flow: POST /api/v1/jobs -> POST .../images (multipart, at most chunk_size files and max_request_bytes per
 * request, three requests in flight; HTTP 429 means "the workers are behind": wait Retry-After and resend)
 * -> POST .../seal -> poll GET .../{id} and GET .../results?cursor=N until the job is finished.
 * Item names are paths relative to the chosen folder ("sub/a.jpg"); files and folders starting with "."
 * are skipped, as the CLI does. Files over the per-image limit are not sent (listed in the message).
 * The token is kept in sessionStorage (this tab only); a link may carry it as #token=...
 */
"use strict";

(function () {
  const API = "/api/v1/jobs";
  const PARALLEL_UPLOADS = 3;
  const POLL_MS = 1000;
  const el = (id) => document.getElementById(id);
  const state = { token: "", selection: [], jobId: null, cursor: 0, polling: null, uploaded: 0, toUpload: 0 };

  // --- token ------------------------------------------------------------------------------------------

  function loadToken() {
    const fromHash = new URLSearchParams(window.location.hash.slice(1)).get("token");
    if (fromHash) {
      sessionStorage.setItem("densecap-token", fromHash);
      history.replaceState(null, "", window.location.pathname);  // keep it out of the address bar
    }
    state.token = sessionStorage.getItem("densecap-token") || "";
    el("token").value = state.token;
    el("auth-state").textContent = state.token ? "token set" : "enter the API token";
  }

  el("save-token").addEventListener("click", () => {
    state.token = el("token").value.trim();
    sessionStorage.setItem("densecap-token", state.token);
    el("auth-state").textContent = state.token ? "token set" : "enter the API token";
    refreshJobs();
  });

  // --- API --------------------------------------------------------------------------------------------

  async function api(method, path, body) {
    for (;;) {
      const init = { method, headers: { Authorization: `Bearer ${state.token}` } };
      if (body instanceof FormData) {
        init.body = body;
      } else if (body !== undefined) {
        init.body = JSON.stringify(body);
        init.headers["Content-Type"] = "application/json";
      }
      const response = await fetch(path, init);
      if (response.status === 429 || response.status === 503) {
        const wait = parseFloat(response.headers.get("Retry-After") || "2");
        await new Promise((resolve) => setTimeout(resolve, Math.min(30, wait) * 1000));
        continue;
      }
      if (!response.ok) {
        let message = `${response.status} ${response.statusText}`;
        try {
          const err = (await response.json()).error;
          if (err && err.message) message = err.message;
        } catch (e) { /* not JSON */ }
        throw new Error(message);
      }
      return response;
    }
  }

  // --- choosing files ---------------------------------------------------------------------------------

  function itemName(file) {
    const rel = file.webkitRelativePath || file.name;
    const parts = rel.split("/");
    if (file.webkitRelativePath) parts.shift();  // the chosen folder itself
    if (parts.some((p) => p.startsWith(".") || p === "")) return null;
    return parts.join("/");
  }

  function choose(fileList) {
    state.selection = [];
    for (const file of fileList) {
      const name = itemName(file);
      if (name) state.selection.push({ name, file });
    }
    state.selection.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
    el("selection").textContent = `${state.selection.length} file(s) chosen`;
    el("start").disabled = state.selection.length === 0;
  }

  el("folder").addEventListener("change", (e) => choose(e.target.files));
  el("files").addEventListener("change", (e) => choose(e.target.files));

  // --- uploading --------------------------------------------------------------------------------------

  function pack(items, limits) {
    const batches = [];
    let current = [];
    let bytes = 0;
    for (const item of items) {
      const cost = item.file.size + 1024 + item.name.length;
      if (current.length && (current.length >= limits.chunk_size || bytes + cost > limits.max_request_bytes)) {
        batches.push(current);
        current = [];
        bytes = 0;
      }
      current.push(item);
      bytes += cost;
    }
    if (current.length) batches.push(current);
    return batches;
  }

  async function uploadAll(jobId, limits) {
    const tooLarge = state.selection.filter((it) => it.file.size > limits.max_image_bytes);
    const items = state.selection.filter((it) => it.file.size <= limits.max_image_bytes);
    if (tooLarge.length) {
      showMessage(`not sent, over ${limits.max_image_bytes} bytes: ${tooLarge.map((it) => it.name).join(", ")}`);
    }
    const batches = pack(items, limits);
    state.uploaded = 0;
    state.toUpload = items.length;
    showUpload();
    let next = 0;
    async function lane() {
      while (next < batches.length) {
        const batch = batches[next++];
        const form = new FormData();
        for (const it of batch) form.append("file", it.file, it.name);
        await api("POST", `${API}/${jobId}/images`, form);
        state.uploaded += batch.length;
        showUpload();
      }
    }
    await Promise.all(Array.from({ length: PARALLEL_UPLOADS }, lane));
  }

  function showUpload() {
    el("upload-progress").max = Math.max(1, state.toUpload);
    el("upload-progress").value = state.uploaded;
    el("upload-text").textContent = `${state.uploaded} / ${state.toUpload}`;
  }

  el("start").addEventListener("click", async () => {
    el("start").disabled = true;
    showMessage("");
    try {
      const label = (state.selection[0] && state.selection[0].file.webkitRelativePath.split("/")[0]) || "browser upload";
      const job = await (await api("POST", API, { label })).json();
      watch(job.id);
      await uploadAll(job.id, job.limits);
      await api("POST", `${API}/${job.id}/seal`);
      refreshJobs();
    } catch (err) {
      showMessage(`upload stopped: ${err.message}`);
    } finally {
      el("start").disabled = state.selection.length === 0;
    }
  });

  // --- watching a job ---------------------------------------------------------------------------------

  function watch(jobId) {
    state.jobId = jobId;
    state.cursor = 0;
    el("results").replaceChildren();
    el("job").hidden = false;
    el("job-id").textContent = jobId;
    el("download").disabled = false;
    if (state.polling) clearTimeout(state.polling);
    poll();
  }

  async function poll() {
    const jobId = state.jobId;
    try {
      const status = await (await api("GET", `${API}/${jobId}`)).json();
      if (jobId !== state.jobId) return;
      showStatus(status);
      const page = await (await api("GET", `${API}/${jobId}/results?cursor=${state.cursor}&limit=200`)).json();
      state.cursor = page.next_cursor;
      showResults(page.results);
      if (page.complete) return;
    } catch (err) {
      showMessage(err.message);
    }
    state.polling = setTimeout(poll, POLL_MS);
  }

  function showStatus(status) {
    const c = status.counts;
    el("job-state").textContent = status.state;
    el("job-state").className = `state ${status.state}`;
    el("caption-progress").max = Math.max(1, c.images);
    el("caption-progress").value = c.done;
    el("caption-text").textContent = `${c.done} / ${c.images} (${c.failed} error${c.failed === 1 ? "" : "s"})`;
    const eta = status.eta_s == null ? "" : `, about ${Math.round(status.eta_s)} s left`;
    el("rate").textContent = `${status.rate.toFixed(2)} images/s${eta}`;
    el("cancel").disabled = status.state === "finished" || status.state === "canceled";
  }

  function showResults(records) {
    const body = el("results");
    for (const rec of records) {
      const row = document.createElement("tr");
      const name = document.createElement("td");
      name.textContent = rec.name;
      const what = document.createElement("td");
      if (rec.error) {
        what.textContent = rec.error;
        what.className = "error";
      } else {
        what.textContent = rec.regions.slice(0, 3).map((r) => r.caption).join(" \u00b7 ") || "(no regions)";
      }
      row.append(name, what);
      body.prepend(row);
    }
    while (body.children.length > 50) body.lastChild.remove();
  }

  el("cancel").addEventListener("click", async () => {
    if (!state.jobId) return;
    try {
      showStatus(await (await api("POST", `${API}/${state.jobId}/cancel`)).json());
    } catch (err) {
      showMessage(err.message);
    }
  });

  el("download").addEventListener("click", async () => {
    try {
      const blob = await (await api("GET", `${API}/${state.jobId}/results?format=jsonl`)).blob();
      const a = document.createElement("a");
      a.href = URL.createObjectURL(blob);
      a.download = `densecap-${state.jobId}.jsonl`;
      a.click();
      setTimeout(() => URL.revokeObjectURL(a.href), 10000);
    } catch (err) {
      showMessage(err.message);
    }
  });

  // --- job list ---------------------------------------------------------------------------------------

  async function refreshJobs() {
    if (!state.token) return;
    try {
      const { jobs } = await (await api("GET", `${API}?limit=20`)).json();
      const list = el("job-list");
      list.replaceChildren();
      for (const job of jobs) {
        const item = document.createElement("li");
        item.textContent = `${job.label || job.id} \u2014 ${job.state}, ${job.counts.done}/${job.counts.images}`;
        const open = document.createElement("button");
        open.type = "button";
        open.textContent = "watch";
        open.addEventListener("click", () => watch(job.id));
        item.append(open);
        list.append(item);
      }
    } catch (err) {
      showMessage(err.message);
    }
  }

  el("refresh").addEventListener("click", refreshJobs);

  function showMessage(text) {
    el("message").textContent = text;
  }

  loadToken();
  refreshJobs();
})();
