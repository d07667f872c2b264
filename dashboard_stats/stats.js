// FedHub live accuracy page: polls the server's public read-only endpoints every 2 s and
// draws the global model's accuracy and loss per round beside a chosen few devices' (toggle
// chips, which a phone can tap; the first few by default), and lists the devices a page at a time, filtered by
// name, with their lifecycle state (an invalid or interrupted device's row stands out).
//
// Everything the server sends is rendered as text (textContent) or handed to Chart.js as
// data: no innerHTML, no eval. Served at /stats/, it reads its own origin; opened as a file
// it reads the server given as ?server=URL (the server answers those GETs with CORS).
// Light or dark follows the system (prefers-color-scheme), the charts included.
//
// The page follows the current run; a server that keeps past runs (GET /api/runs) gets a run
// picker, and a past run chosen there is shown as it ended (GET /api/runs/<id>: its status,
// settings and rounds), read-only, while the devices table stays live.
"use strict";

(function () {
  const POLL_MS = 2000; // at most one poll every 2 s
  const DEFAULT_SERVER = "http://127.0.0.1:4000";
  const PALETTE = ["#e8590c", "#2f9e44", "#9c36b5", "#1098ad", "#f08c00", "#c2255c",
                   "#5c940d", "#3b5bdb", "#862e9c", "#0b7285"];
  const GLOBAL_COLOUR = "#1c7ed6";
  const WORST_COLOUR = "#1864ab"; // the worst 10 % of devices: GLOBAL_COLOUR, darker
  const PERSONAL_COLOUR = "#e8590c"; // personal models, beside the global one
  const SERVER_COLOUR = "#868e96"; // the server's own test accuracy, for comparison
  const BAND_EDGE = "rgba(28, 126, 214, 0.45)"; // the worst and the best device, GLOBAL_COLOUR faded
  const BAND_FILL = "rgba(28, 126, 214, 0.16)";
  const NO_PERSONAL = "—"; // a device without a personal model (personalization "none")
  // Lifecycle states that get a row highlight; the class name is built only from this list.
  const FLAGGED = ["invalid", "interrupted"];
  const PAGE_SIZE = 25; // devices-table rows per page
  const CHART_DEVICES = 5; // devices drawn beside the global model until others are picked
  // What the reader chose: the table's page and name filter, the charts' devices (null: the default few).
  // ``run``: the past run shown (its id), or null for the current run, live.
  const view = { offset: 0, name: "", chosen: null, run: null };

  const $ = (id) => document.getElementById(id);

  function serverBase() {
    const given = new URLSearchParams(window.location.search).get("server");
    if (given) {
      try {
        const url = new URL(given);
        if (url.protocol === "http:" || url.protocol === "https:") {
          return url.origin + url.pathname.replace(/\/+$/, "");
        }
      } catch (err) {
        // fall through to the default below, and say so
      }
      setConnection(`?server=${given} is not an http(s) URL; using the default`, "bad");
    }
    if (window.location.protocol === "http:" || window.location.protocol === "https:") {
      return window.location.origin;
    }
    return DEFAULT_SERVER;
  }

  function setConnection(text, kind) {
    const el = $("connection");
    el.textContent = text;
    el.className = "connection " + (kind || "");
  }

  function setText(id, value) {
    $(id).textContent = value;
  }

  function fmt(value, digits) {
    return typeof value === "number" && Number.isFinite(value) ? value.toFixed(digits) : "–";
  }

  function ago(epochSeconds) {
    if (typeof epochSeconds !== "number" || !epochSeconds) return "never";
    const s = Math.max(0, Math.round(Date.now() / 1000 - epochSeconds));
    if (s < 60) return `${s} s ago`;
    if (s < 3600) return `${Math.round(s / 60)} min ago`;
    return new Date(epochSeconds * 1000).toLocaleString();
  }

  function row(cells, className) {
    const tr = document.createElement("tr");
    if (className) tr.className = className;
    for (const cell of cells) {
      const td = document.createElement("td");
      td.textContent = cell;
      tr.appendChild(td);
    }
    return tr;
  }

  function fillTable(id, rows, classNames) {
    $(id).replaceChildren(...rows.map((cells, i) => row(cells, classNames && classNames[i])));
  }

  async function getJSON(base, path) {
    const response = await fetch(base + path, { cache: "no-store" });
    if (!response.ok) throw new Error(`${path} answered HTTP ${response.status}`);
    return response.json();
  }

  // ---------------------------------------------------------------- charts

  // The charts' text and grid lines take the page's colours (style.css), now and whenever
  // the system switches between light and dark.
  function applyTheme(charts) {
    const css = window.getComputedStyle(document.documentElement);
    const text = css.getPropertyValue("--muted").trim();
    const grid = css.getPropertyValue("--grid").trim();
    window.Chart.defaults.color = text;
    window.Chart.defaults.borderColor = grid;
    for (const chart of charts) {
      for (const scale of Object.values(chart.options.scales)) {
        scale.ticks.color = text;
        scale.title.color = text;
        scale.grid.color = grid;
        scale.border.color = grid;
      }
      chart.options.plugins.legend.labels.color = text;
      chart.update();
    }
  }

  // ``legend`` and ``tooltip``: options of those plugins beyond the page's defaults.
  function makeChart(canvasId, yTitle, maximum, legend, tooltip) {
    const y = { title: { display: true, text: yTitle } };
    if (maximum !== undefined) y.max = maximum;
    return new window.Chart($(canvasId), {
      type: "line",
      data: { labels: [], datasets: [] },
      options: {
        animation: false,
        responsive: true,
        maintainAspectRatio: false,
        interaction: { mode: "index", intersect: false },
        scales: { x: { title: { display: true, text: "round" } }, y: y },
        plugins: {
          legend: { position: "bottom", labels: { usePointStyle: true, ...(legend || {}) } },
          tooltip: tooltip || {},
        },
      },
    });
  }

  function series(label, values, colour, isGlobal) {
    return {
      label: label,
      data: values,
      borderColor: colour,
      backgroundColor: colour,
      borderWidth: isGlobal ? 3 : 1.5,
      borderDash: isGlobal ? [] : [5, 4],
      pointRadius: isGlobal ? 4 : 2,
      spanGaps: true,
      tension: 0.2,
    };
  }

  // Every device named in the history, sorted.
  function historyNames(rounds) {
    const names = new Set();
    for (const r of rounds) {
      for (const name of Object.keys(r.devices || {})) names.add(name);
    }
    return [...names].sort();
  }

  function chosenNames(rounds) {
    const names = historyNames(rounds);
    if (view.chosen === null) return names.slice(0, CHART_DEVICES);
    return names.filter((name) => view.chosen.includes(name));
  }

  // The picker: one toggle chip (a checkbox in a label) per device of the history, rebuilt
  // only when that list or the choice changes. A tap turns a device on or off: no Ctrl-click.
  function renderPicker(rounds) {
    const picker = $("chart-devices");
    const names = historyNames(rounds);
    const chosen = chosenNames(rounds);
    const signature = JSON.stringify([names, chosen]);
    if (picker.fedhubSignature === signature) return;
    picker.fedhubSignature = signature;
    picker.replaceChildren(...names.map((name) => {
      const label = document.createElement("label");
      const box = document.createElement("input");
      box.type = "checkbox";
      box.value = name;
      box.checked = chosen.includes(name);
      label.append(box, document.createTextNode(name));
      return label;
    }));
    setText("chart-devices-note", names.length
      ? `${chosen.length} of ${names.length} devices drawn beside the global model, which is always `
        + "drawn; tap a device to add it to the charts or take it off."
      : "No round has completed yet: the devices to compare with the global model appear after round 1.");
  }

  function chartData(rounds, globalKey, deviceKey, globalLabel) {
    const names = chosenNames(rounds);
    const metric = (r, name) => {
      const m = (r.devices || {})[name];
      return m && typeof m[deviceKey] === "number" ? m[deviceKey] : null;
    };
    const datasets = [series(globalLabel, rounds.map((r) => r[globalKey]), GLOBAL_COLOUR, true)];
    names.forEach((name, i) => {
      datasets.push(series(name, rounds.map((r) => metric(r, name)), PALETTE[i % PALETTE.length], false));
    });
    // Asynchronous mode: each point is a model version, labelled with the time it was made.
    const label = (r) => (r.mode === "async"
      ? `v${r.round} · ${new Date(r.closed_at * 1000).toLocaleTimeString()}` : String(r.round));
    return { labels: rounds.map(label), datasets: datasets };
  }

  function updateChart(chart, data) {
    // no round yet: a sentence instead of an empty chart with a made-up axis
    chart.canvas.closest("figure").classList.toggle("empty", data.labels.length === 0);
    const signature = JSON.stringify(data);
    if (chart.fedhubSignature === signature) return; // nothing new: no redraw
    chart.fedhubSignature = signature;
    chart.data.labels = data.labels;
    chart.data.datasets = data.datasets;
    chart.update();
  }

  // ---------------------------------------------------------------- federated evaluation

  // Each round's chosen devices evaluate, on their own held-out data, the global model they
  // trained from and (with personalization) their personal model after local training; the
  // round's history entry holds it as ``federated_evaluation`` (null: no device evaluated;
  // absent: an older run). Shaped as fedhub/dashboard/federated_eval.py shapes it for the
  // Streamlit dashboard. Where the points go: the server's test_accuracy of entry r is the
  // model made BY round r, while the global distribution in entry r is of model_version (r - 1
  // in synchronous mode): drawn at x = model_version; the personal one at x = r.

  const POINT_FIELDS = ["worst", "best", "mean", "worst_10pct", "personal_mean", "personal_worst_10pct",
                        "test_accuracy"];

  function finite(v) {
    return typeof v === "number" && Number.isFinite(v) ? v : null;
  }

  function whole(v) {
    const n = finite(v);
    return n !== null && Number.isInteger(n) ? n : null;
  }

  function isObject(v) {
    return v !== null && typeof v === "object" && !Array.isArray(v);
  }

  function fedReport(entry) {
    const fe = isObject(entry) ? entry.federated_evaluation : null;
    return isObject(fe) ? fe : null;
  }

  // A Summary with every field (null where missing), or null when it says nothing of accuracy.
  function fedSummary(v) {
    if (!isObject(v)) return null;
    const out = { devices: whole(v.devices), num_examples: whole(v.num_examples) };
    for (const k of ["loss", "accuracy", "worst_10pct", "worst", "best", "std"]) out[k] = finite(v[k]);
    return ["accuracy", "worst_10pct", "worst", "best"].every((k) => out[k] === null) ? null : out;
  }

  // The global model the devices evaluated: model_version, else the round before the entry's.
  function evaluatedVersion(entry, fe) {
    const v = whole(fe.model_version);
    if (v !== null) return v;
    const r = whole(entry.round);
    return r === null ? null : r - 1;
  }

  // One point per x, ascending; [] when no entry has a distribution to draw.
  function fedEvalPoints(rounds) {
    const points = new Map();
    let drawn = false;
    const at = (x) => {
      if (!points.has(x)) points.set(x, Object.fromEntries([["x", x], ...POINT_FIELDS.map((f) => [f, null])]));
      return points.get(x);
    };
    for (const entry of rounds) {
      if (!isObject(entry)) continue;
      const r = whole(entry.round);
      const accuracy = finite(entry.test_accuracy);
      if (r !== null && accuracy !== null) at(r).test_accuracy = accuracy;
      const fe = fedReport(entry);
      if (fe === null) continue;
      const g = fedSummary(fe.global);
      const version = evaluatedVersion(entry, fe);
      if (g !== null && version !== null) {
        Object.assign(at(version), { worst: g.worst, best: g.best, mean: g.accuracy, worst_10pct: g.worst_10pct });
        drawn = true;
      }
      const p = fedSummary(fe.personal);
      if (p !== null && r !== null) {
        Object.assign(at(r), { personal_mean: p.accuracy, personal_worst_10pct: p.worst_10pct });
        drawn = true;
      }
    }
    return drawn ? [...points.values()].sort((a, b) => a.x - b.x) : [];
  }

  function accuracyOf(v) {
    return isObject(v) ? finite(v.accuracy) : null;
  }

  // One row per device of a report, worst global accuracy first (none last), then by name.
  function fedEvalRows(fe) {
    const devices = fe && isObject(fe.devices) ? fe.devices : {};
    const rows = Object.keys(devices).map((name) => {
      const d = isObject(devices[name]) ? devices[name] : {};
      return { device: name, num_examples: whole(d.num_examples), global_accuracy: accuracyOf(d.global),
               personal_accuracy: accuracyOf(d.personal) };
    });
    const key = (row) => (row.global_accuracy === null ? Infinity : row.global_accuracy);
    return rows.sort((a, b) => key(a) - key(b) || (a.device < b.device ? -1 : a.device > b.device ? 1 : 0));
  }

  // The latest entry whose report has a summary or a device, or null.
  function latestFedEval(rounds) {
    let found = null;
    for (const entry of rounds) {
      const fe = fedReport(entry);
      if (fe === null) continue;
      const rows = fedEvalRows(fe);
      const g = fedSummary(fe.global);
      const p = fedSummary(fe.personal);
      if (rows.length || g !== null || p !== null) {
        found = { round: whole(entry.round), model_version: evaluatedVersion(entry, fe),
                  personalization: typeof fe.personalization === "string" ? fe.personalization : "none",
                  global: g, personal: p, rows: rows };
      }
    }
    return found;
  }

  // "Round 4: global model v3 on 10 devices, 1200 held-out examples; personal models (ditto) ..."
  function fedEvalText(latest) {
    const g = latest.global || {};
    const devices = g.devices !== null && g.devices !== undefined ? g.devices : latest.rows.length;
    let examples = g.num_examples;
    if (examples === null || examples === undefined) {
      const known = latest.rows.map((row) => row.num_examples).filter((n) => n !== null);
      examples = known.length ? known.reduce((a, b) => a + b, 0) : null;
    }
    let what = `${devices} device${devices === 1 ? "" : "s"}`;
    if (examples !== null) what += `, ${examples} held-out example${examples === 1 ? "" : "s"}`;
    const model = latest.model_version === null ? "the global model" : `global model v${latest.model_version}`;
    const personal = latest.personalization === "none" ? ""
      : `; personal models (${latest.personalization}) after the round's training`;
    const where = latest.round === null ? "The latest report" : `Round ${latest.round}`;
    return `${where}: ${model} on ${what}${personal}. Worst global accuracy first.`;
  }

  function fedEvalChartData(points) {
    const column = (field) => points.map((p) => p[field]);
    const edge = (label, field, fill, tooltip, legend) => ({
      label: label, data: column(field), borderColor: BAND_EDGE, backgroundColor: BAND_FILL, borderWidth: 1,
      pointRadius: 0, pointHitRadius: 6, fill: fill, spanGaps: true, tension: 0,  // straight: smoothed, an edge overshoots 1
      fedhubTooltip: tooltip, fedhubNoLegend: !legend,
    });
    const datasets = [
      edge("worst device", "worst", false, "worst device", false),
      edge("global: worst–best device", "best", "-1", "best device", true),
      series("global: mean (by examples)", column("mean"), GLOBAL_COLOUR, true),
      // a marker of its own besides the dash, so that no line is told apart by colour alone
      { ...series("global: worst 10 % of devices", column("worst_10pct"), WORST_COLOUR, false),
        pointStyle: "triangle", pointRadius: 3 },
    ];
    if (points.some((p) => p.personal_mean !== null)) {
      datasets.push(series("personal: mean (by examples)", column("personal_mean"), PERSONAL_COLOUR, true));
    }
    datasets.push({ ...series("server: test accuracy", column("test_accuracy"), SERVER_COLOUR, false),
                    borderDash: [2, 3], borderWidth: 2, pointStyle: "rectRot", pointRadius: 3 });
    return { labels: points.map((p) => String(p.x)), datasets: datasets };
  }

  // What the chart shows, for a screen reader: the latest point with a distribution.
  function fedEvalLabel(points) {
    const g = points.filter((p) => p.mean !== null).pop();
    const p = points.filter((q) => q.personal_mean !== null).pop();
    const parts = [];
    if (g) parts.push(`global model ${g.x}: mean ${fmt(g.mean, 4)}, worst 10 % ${fmt(g.worst_10pct, 4)}, `
      + `devices from ${fmt(g.worst, 4)} to ${fmt(g.best, 4)}`);
    if (p) parts.push(`personal models after round ${p.x}: mean ${fmt(p.personal_mean, 4)}`);
    return `each round's device accuracy on held-out data${parts.length ? "; latest " + parts.join("; ") : ""}`;
  }

  function renderFedEval(chart, rounds) {
    const points = fedEvalPoints(rounds);
    const latest = latestFedEval(rounds);
    updateChart(chart, fedEvalChartData(points));
    chart.canvas.setAttribute("aria-label", fedEvalLabel(points));
    setText("fed-eval-none", latest ? "The latest report has no summary to draw: its devices are listed."
      : "No device has evaluated yet: devices need held-out data (--holdout).");
    $("fed-eval-table").hidden = latest === null;
    if (latest === null) {
      fillTable("fed-eval-devices", []);
      setText("fed-eval-what", "");
      return;
    }
    setText("fed-eval-what", fedEvalText(latest));
    fillTable("fed-eval-devices", latest.rows.map((row) => [
      row.device, row.num_examples === null ? "–" : String(row.num_examples), fmt(row.global_accuracy, 4),
      row.personal_accuracy === null ? NO_PERSONAL : fmt(row.personal_accuracy, 4),
    ]));
    markAttackers("fed-eval-devices", 0);
  }

  // ---------------------------------------------------------------- efficiency

  // With --efficiency the server times once, at start-up, one process training its network on a
  // sample of test images (GET /api/status ``efficiency``: s_per_image, images, startup_s), and
  // each round's entry holds ``efficiency``: {images, round_s, centralized_s, ratio, test_s}, the
  // time one process takes for the round's images over the round's own time (test_s: the server's
  // test of the new model, part of the round's time). Shaped, and written, as
  // fedhub/dashboard/efficiency.py does for the Streamlit dashboard.

  const NO_EFFICIENCY = "—"; // a round (or a run) without the figure
  const EFFICIENCY_WHAT = "The time one process takes to train the round's images, over the round's own time "
    + "(1.0: as fast as one process holding all the data).";

  // An entry's figure with every field (null where missing), or null without a usable ratio.
  function efficiencyOf(entry) {
    const e = isObject(entry) ? entry.efficiency : null;
    if (!isObject(e)) return null;
    const ratio = finite(e.ratio);
    if (ratio === null || ratio < 0) return null;
    return { images: whole(e.images), round_s: finite(e.round_s), centralized_s: finite(e.centralized_s),
             ratio: ratio, test_s: finite(e.test_s) };
  }

  // The latest and the first figure (each with its round), the median ratio of the rounds after
  // the first (the upper one), and how many rounds have one; null when none has.
  function efficiencySummary(rounds) {
    const seen = [];
    for (const entry of rounds) {
      const found = efficiencyOf(entry);
      if (found !== null) seen.push({ round: whole(entry.round), ...found });
    }
    if (!seen.length) return null;
    const later = seen.slice(1).map((s) => s.ratio).sort((a, b) => a - b);
    return { latest: seen[seen.length - 1], first: seen[0], count: seen.length,
             steady: later.length ? later[Math.floor(later.length / 2)] : null };
  }

  // The status's one-process reference, or null (off, an older server, no usable rate).
  function efficiencyReference(status) {
    const e = isObject(status) ? status.efficiency : null;
    if (!isObject(e)) return null;
    const sPerImage = finite(e.s_per_image);
    if (sPerImage === null || sPerImage <= 0) return null;
    return { s_per_image: sPerImage, images: whole(e.images), startup_s: finite(e.startup_s) };
  }

  // "0.66×": two decimals, or two significant digits below 0.1 ("0.043×").
  function ratioText(ratio) {
    if (ratio === null) return NO_EFFICIENCY;
    const digits = ratio >= 0.1 || ratio === 0 ? 2 : Math.min(6, 1 - Math.floor(Math.log10(ratio)));
    return `${ratio.toFixed(digits)}×`;
  }

  // A round's cell in the Rounds table: its ratio, or a dash.
  function efficiencyCell(entry) {
    const found = efficiencyOf(entry);
    return found === null ? NO_EFFICIENCY : ratioText(found.ratio);
  }

  function roundOf(found) {
    return found.round === null ? "?" : String(found.round);
  }

  // What the figure is, the latest round's times, how one process was timed, the first round's.
  function efficiencyExplain(summary, reference) {
    if (summary === null && reference === null) return "";
    const parts = [EFFICIENCY_WHAT];
    if (summary !== null) {
      const l = summary.latest;
      if (l.images !== null && l.centralized_s !== null && l.round_s !== null) {
        const tested = l.test_s === null ? "" : ` (${l.test_s.toFixed(2)} s of it testing the new model)`;
        parts.push(`Round ${roundOf(l)}: one process would train its ${l.images} images in `
          + `${l.centralized_s.toFixed(2)} s; the round took ${l.round_s.toFixed(2)} s${tested}.`);
      }
    }
    if (reference !== null) {
      const timed = reference.images !== null ? `on ${reference.images} test images` : "on a sample of test images";
      const startup = reference.startup_s === null ? ""
        : ` (its own start-up, ${reference.startup_s.toFixed(2)} s, not counted)`;
      parts.push(`One process was timed at start-up ${timed}: ${(1 / reference.s_per_image).toFixed(0)} `
        + `images/s${startup}.`);
    }
    if (summary === null) {
      parts.push("Each round's figure comes when it completes.");
    } else if (summary.count === 1) {
      parts.push("This first round's time includes the devices' start-up.");
    } else {
      parts.push(`Round ${roundOf(summary.first)}, with the devices' start-up: ${ratioText(summary.first.ratio)}; `
        + `the median of the rounds after it: ${ratioText(summary.steady)}.`);
    }
    return parts.join(" ");
  }

  // The Efficiency card: the latest round's figure, the first round's under it; hidden for a run
  // without the figure. ``status``: the current run's (null for a past run).
  function renderEfficiency(rounds, status) {
    const summary = efficiencySummary(rounds);
    const reference = efficiencyReference(status);
    const what = efficiencyExplain(summary, reference);
    $("efficiency-card").hidden = what === "";
    $("efficiency-card").title = what;
    setText("efficiency-what", what);
    setText("efficiency", summary === null ? NO_EFFICIENCY : `${ratioText(summary.latest.ratio)} one process`);
    setText("efficiency-first", summary === null || summary.count < 2 ? ""
      : `round ${roundOf(summary.first)}: ${ratioText(summary.first.ratio)} with start-up`);
  }

  // ---------------------------------------------------------------- rendering

  // The cards' and the table's labels: rounds, or in asynchronous mode model versions.
  function setLabels(asynchronous) {
    const labels = asynchronous
      ? { completed: "Model version", "current-round": "Next version", reported: "Updates buffered",
        deadline: "Max staleness" }
      : { completed: "Completed rounds", "current-round": "Current round", reported: "Updates received",
        deadline: "Deadline" };
    for (const [id, text] of Object.entries(labels)) $(id).previousElementSibling.textContent = text;
    $("rounds-title").textContent = asynchronous ? "Model versions" : "Rounds";
    $("rounds-key").textContent = asynchronous ? "Version" : "Round";
  }

  function renderAsyncStatus(status) {
    const total = status.total_rounds ? ` / ${status.total_rounds}` : "";
    setText("completed", `${status.model_version}${total}`);
    const b = status.buffer || {};
    setText("current-round", `v${b.target}`);
    setText("reported", `${b.received} of ${status.buffer_size}`);
    setText("deadline", `${status.max_staleness} versions`);
  }

  function renderStatus(status) {
    setText("status", status.status);
    setLabels(status.mode === "async");
    const total = status.total_rounds ? ` / ${status.total_rounds}` : "";
    setText("completed", `${status.completed_rounds}${total}`);
    const r = status.round;
    if (status.mode === "async") {
      renderAsyncStatus(status);
    } else if (r && r.state === "aggregating") {
      setText("current-round", `#${r.number} (aggregating)`);
      setText("reported", "–");
      setText("deadline", "–");
    } else if (r) {
      setText("current-round", `#${r.number}`);
      setText("reported", `${r.reported.length} of ${r.selected.length} (need ${r.needed})`);
      setText("deadline", `in ${Math.round(r.deadline_in)} s`);
    } else {
      setText("current-round", "none open");
      setText("reported", "–");
      setText("deadline", "–");
    }
    setText("reason", status.reason || status.last_error || "");
    setText("strategy", status.strategy ? withSettings(status.strategy.name, status.strategy.params) : "–");
    setText("compression", compressionText(status.compression));
    setText("epsilon", privacyText(status.privacy));
    setText("secagg", secureText(status));
  }

  // "ε 2.31 at δ 1e-05 (max 8)": the privacy spent so far (status.privacy), or "no DP".
  function privacyText(p) {
    if (!p) return "no DP";
    const max = typeof p.max_epsilon === "number" ? ` (max ${p.max_epsilon})` : "";
    return `ε ${epsilonText(p.epsilon, 2)} at δ ${p.delta.toExponential(0)}${max}`;
  }

  // Epsilon is null (infinite) once a round ran without noise.
  function epsilonText(epsilon, digits) {
    return epsilon === null ? "∞" : fmt(epsilon, digits);
  }

  // How updates travel: "q4, the download compressed too", or "uncompressed".
  function compressionText(c) {
    if (!c || c.uplink === "none") return "uncompressed";
    return c.downlink ? `${c.uplink}, the download compressed too` : c.uplink;
  }

  // On or off; when on, its settings and the open round's stage.
  function secureText(status) {
    const s = status.secure_aggregation;
    if (!s) return "off (the server sees each update)";
    const stage = status.round && status.round.secagg ? ` · round ${status.round.number} at stage ${status.round.secagg.stage}` : "";
    return `on (SecAgg+: ${s.shares} shares, threshold ${s.threshold || "a strict majority"}, clip ±${s.clip_range})${stage}`;
  }

  // A round's secure aggregation: masked updates summed, dropouts recovered.
  function roundSecure(r) {
    const s = r.secagg;
    if (!s) return "off";
    return `${s.survivors} summed (threshold ${s.threshold}), ${s.recovered.length} dropout(s) recovered`;
  }

  function localAccuracy(latest) {
    if (!latest) return "–";
    if (latest.failed) return `update failed (round ${latest.round})`;
    return `${fmt(latest.accuracy, 4)} (round ${latest.round})`;
  }

  // A training device's batches done in the open round, after its state ("training · 40/188 batches").
  function stateWithProgress(d, progress) {
    const p = progress && Object.prototype.hasOwnProperty.call(progress, d.name) ? progress[d.name] : null;
    return p ? `${d.state} · ${p.done}/${p.total} batches` : d.state;
  }

  // "scale (factor=10)": a strategy's or an attack's name with its settings.
  function withSettings(name, params) {
    const settings = Object.keys(params || {}).map((k) => `${k}=${params[k]}`).join(", ");
    return settings ? `${name} (${settings})` : name;
  }

  function devicesPath() {
    const query = new URLSearchParams({ offset: String(view.offset), limit: String(PAGE_SIZE) });
    if (view.name) query.set("name", view.name);
    return `/api/devices?${query}`;
  }

  function renderPager(answer) {
    const shown = answer.devices.length;
    setText("devices-range", answer.total
      ? `${answer.offset + 1}–${answer.offset + shown} of ${answer.total}`
      : (view.name ? "no device matches" : "no device yet"));
    $("devices-prev").disabled = answer.offset === 0;
    $("devices-next").disabled = answer.offset + shown >= answer.total;
  }

  function renderDevices(devices, progress) {
    for (const d of devices) {
      if (d.attack) attackers.set(d.name, withSettings(d.attack.kind, d.attack.params));
    }
    fillTable("devices", devices.map((d) => [
      d.name, stateWithProgress(d, progress), d.lifecycle || "–", d.lifecycle_reason || "", ago(d.last_seen),
      d.num_examples === null || d.num_examples === undefined ? "–" : String(d.num_examples),
      localAccuracy(d.latest), d.attack ? withSettings(d.attack.kind, d.attack.params) : "–",
    ]), devices.map((d) => {
      if (FLAGGED.includes(d.lifecycle)) return `lifecycle-${d.lifecycle}`;
      return d.attack ? "attacker" : "";
    }));
    markAttackers("devices", 0);
  }

  // Devices that declared an attack, as seen on any page of the devices table: name -> attack.
  const attackers = new Map();

  // The name cell (column ``column``) of each row about a declared attacker gets the attack as a
  // data attribute, which style.css shows beside the name (text, never markup).
  function markAttackers(tableId, column) {
    for (const tr of $(tableId).rows) {
      const cell = tr.cells[column];
      const attack = attackers.get(cell.textContent);
      if (attack !== undefined) {
        cell.dataset.attack = attack;
        cell.title = `declared attack: ${attack}`;
      }
    }
  }

  // What a strategy did with one update (its entry in RoundResult.metrics["updates"]).
  function outcomeOf(a) {
    if (a.status === "rejected") return { outcome: "rejected", why: a.reason || "" };
    if (typeof a.trimmed_share === "number" && a.trimmed_share > 0) {
      return { outcome: "clipped", why: `${(100 * a.trimmed_share).toFixed(1)}% of its coordinates cut` };
    }
    return { outcome: "kept", why: "" };
  }

  // Every update of each round where the strategy rejected or clipped one, newest round first:
  // the kept ones too, so that a round of Krum reads "kept one, rejected the rest".
  function screened(rounds) {
    const out = [];
    for (const r of rounds.slice().reverse()) {
      const names = Object.keys(r.devices || {}).sort().filter((name) => r.devices[name].aggregation);
      const rows = names.map((name) => {
        const a = r.devices[name].aggregation;
        return { round: r.round, device: name, score: a.score, distance: a.distance, ...outcomeOf(a) };
      });
      if (rows.some((u) => u.outcome !== "kept")) out.push(...rows);
    }
    return out;
  }

  function renderScreened(rounds) {
    const rows = screened(rounds);
    fillTable("screened", rows.map((u) => [String(u.round), u.device, u.outcome, u.why, fmt(u.score, 4),
      fmt(u.distance, 4)]),
    rows.map((u) => `outcome-${u.outcome}${attackers.has(u.device) ? " attacker" : ""}`));
    markAttackers("screened", 1);
    setText("screened-none", rounds.length && !rows.length ? "Every update so far was used in full." : "");
  }

  // "5 devices, 1 update used" when a strategy left some out; else the number of updates.
  function updatesText(r) {
    const used = typeof r.num_used === "number" ? r.num_used : r.num_updates;
    if (used === r.num_updates) return String(r.num_updates);
    return `${r.num_updates} devices, ${used} update${used === 1 ? "" : "s"} used`;
  }

  function renderFailures(failures) {
    fillTable("failures", (failures || []).slice().reverse().map((f) => [
      String(f.round), ago(f.failed_at), f.reason,
    ]));
  }

  function renderRounds(rounds) {
    const newestFirst = rounds.slice().reverse();
    fillTable("rounds", newestFirst.map((r) => [
      String(r.round), fmt(r.test_accuracy, 4), fmt(r.test_loss, 4),
      updatesText(r), String(r.num_examples), r.privacy ? epsilonText(r.privacy.epsilon, 3) : "–",
      efficiencyCell(r), roundSecure(r),
    ]));
    const last = rounds[rounds.length - 1];
    setText("latest-accuracy", last ? fmt(last.test_accuracy, 4) : "–");
  }

  // ---------------------------------------------------------------- runs

  // "fedmedian-2 · finished (current)": a run as the picker names it (as the dashboard does):
  // its name, unique on the server, else "#ID strategy".
  function runLabel(run) {
    const settings = run.settings || {};
    const what = run.name || `#${run.id} ${settings.strategy || "run"}`;
    return `${what} · ${run.status}${run.current ? " (current)" : ""}`;
  }

  // The picker: the current run, then every past run, newest first; rebuilt only when the list
  // changes. Hidden for a server without runs.
  function renderRunPicker(runs) {
    const picker = $("run-picker");
    picker.hidden = runs === null;
    if (runs === null) return;
    const past = runs.filter((r) => !r.current);
    const select = $("run-select");
    const signature = JSON.stringify(past.map((r) => [r.id, runLabel(r)]));
    if (select.fedhubSignature !== signature) {
      select.fedhubSignature = signature;
      const current = document.createElement("option");
      current.value = "";
      current.textContent = "the current run (live)";
      select.replaceChildren(current, ...past.map((r) => {
        const option = document.createElement("option");
        option.value = String(r.id);
        option.textContent = runLabel(r);
        return option;
      }));
      if (view.run !== null && !past.some((r) => r.id === view.run)) view.run = null; // deleted
      select.value = view.run === null ? "" : String(view.run);
    }
    picker.classList.toggle("past", view.run !== null);
    setText("run-note", view.run === null ? ""
      : "a past run, as it ended (read-only); the devices table is live");
  }

  // A past run's cards, from what GET /api/runs/<id> says of it.
  function renderPastRun(run) {
    const settings = run.settings || {};
    setText("status", run.status);
    setLabels(settings.mode === "async");
    const total = run.total_rounds ? ` / ${run.total_rounds}` : "";
    setText("completed", `${run.completed_rounds}${total}`);
    setText("current-round", "–");
    setText("reported", "–");
    setText("deadline", "–");
    setText("reason", run.finished_at ? `a past run, finished ${ago(run.finished_at)}` : "a past run");
    setText("strategy", settings.strategy ? withSettings(settings.strategy, settings.strategy_params) : "–");
    setText("compression", compressionText(settings.compression
      ? { uplink: settings.compression, downlink: settings.compress_downlink } : null));
    const spent = (run.history || []).filter((r) => r.privacy).pop();
    setText("epsilon", spent ? privacyText(spent.privacy) : (settings.dp ? "–" : "no DP"));
    setText("secagg", settings.secagg ? "on (SecAgg+)" : "off (the server sees each update)");
  }

  // A finished past run cannot change: asked for once.
  const pastRuns = new Map();
  async function pastRun(base, id) {
    if (pastRuns.has(id)) return pastRuns.get(id);
    const run = await getJSON(base, `/api/runs/${encodeURIComponent(id)}`);
    if (run.status === "finished" && !run.current) pastRuns.set(id, run);
    return run;
  }

  // Every run, or null from a server without runs (an older one: 404).
  async function listRuns(base) {
    const response = await fetch(base + "/api/runs", { cache: "no-store" });
    if (response.status === 404) return null;
    if (!response.ok) throw new Error(`/api/runs answered HTTP ${response.status}`);
    return (await response.json()).runs;
  }

  // ---------------------------------------------------------------- loop

  function start() {
    const base = serverBase();
    setText("server-url", base);
    const accuracy = makeChart("accuracy-chart", "accuracy", 1);
    const loss = makeChart("loss-chart", "loss");
    // the band's lower edge has no legend entry of its own; each edge says which it is on hover
    const fedEval = makeChart("fed-eval-chart", "accuracy", 1,
      { filter: (item, data) => !data.datasets[item.datasetIndex].fedhubNoLegend },
      { callbacks: { label: (context) =>
        `${context.dataset.fedhubTooltip || context.dataset.label}: ${context.formattedValue}` } });
    const charts = [accuracy, loss, fedEval];
    applyTheme(charts);
    window.matchMedia("(prefers-color-scheme: dark)")
      .addEventListener("change", () => applyTheme(charts));

    let rounds = [];
    function drawCharts() {
      renderPicker(rounds);
      updateChart(accuracy, chartData(rounds, "test_accuracy", "accuracy", "global (test set)"));
      updateChart(loss, chartData(rounds, "test_loss", "loss", "global (test set)"));
      renderFedEval(fedEval, rounds);
    }

    // One poll at a time: a change of page or filter asks for one now, after the one under way.
    let timer = null;
    let polling = false;
    let again = false;
    async function poll() {
      window.clearTimeout(timer);
      if (polling) {
        again = true;
        return;
      }
      polling = true;
      try {
        const [status, history, devices, runs] = await Promise.all([
          getJSON(base, "/api/status"), getJSON(base, "/api/history"), getJSON(base, devicesPath()),
          listRuns(base),
        ]);
        if (devices.total && devices.offset >= devices.total) { // the filter left fewer pages
          view.offset = Math.floor((devices.total - 1) / PAGE_SIZE) * PAGE_SIZE;
          again = true;
        }
        renderRunPicker(runs);
        const past = view.run === null ? null : await pastRun(base, view.run);
        const shown = past ? { rounds: past.history || [], failures: [] } : history;
        const mode = past ? (past.settings || {}).mode : status.mode;
        rounds = shown.rounds;
        if (past) renderPastRun(past); else renderStatus(status);
        renderRounds(shown.rounds);
        renderEfficiency(shown.rounds, past ? null : status);
        renderDevices(devices.devices, status.round && status.round.progress);
        renderPager(devices);
        renderScreened(shown.rounds);
        renderFailures(shown.failures);
        const xTitle = mode === "async" ? "model version (time made)" : "round";
        for (const chart of [accuracy, loss]) chart.options.scales.x.title.text = xTitle;
        fedEval.options.scales.x.title.text = mode === "async" ? "model version" : "round";
        drawCharts();
        setConnection(`connected to ${base} · updated ${new Date().toLocaleTimeString()}`, "ok");
      } catch (err) {
        setConnection(`cannot reach the FedHub server at ${base} (${err.message}); retrying every 2 s`, "bad");
      } finally {
        polling = false;
        timer = window.setTimeout(poll, again ? 0 : POLL_MS);
        again = false;
      }
    }

    $("devices-prev").addEventListener("click", () => {
      view.offset = Math.max(0, view.offset - PAGE_SIZE);
      poll();
    });
    $("devices-next").addEventListener("click", () => {
      view.offset += PAGE_SIZE;
      poll();
    });
    $("device-filter").addEventListener("input", (event) => {
      // The server takes a part of a name: letters, digits, '_' and '-'.
      view.name = event.target.value.replace(/[^A-Za-z0-9_-]/g, "").slice(0, 64);
      view.offset = 0;
      poll();
    });
    $("run-select").addEventListener("change", (event) => {
      view.run = event.target.value === "" ? null : Number(event.target.value);
      poll();
    });
    $("chart-devices").addEventListener("change", () => {
      view.chosen = [...$("chart-devices").querySelectorAll("input:checked")].map((box) => box.value);
      drawCharts();
    });
    poll();
  }

  if (typeof window.Chart !== "function") {
    setConnection("Chart.js did not load (dashboard_stats/vendor/chart.umd.min.js is missing)", "bad");
  } else {
    start();
  }
})();
