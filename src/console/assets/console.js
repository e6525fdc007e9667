// The console's only script (served from /console/assets, so the Content-Security-Policy
// needs no inline script): copy buttons, and the overview's live figures and chart.
"use strict";

function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    return navigator.clipboard.writeText(text);
  }
  // Plain http (no secure context): select a hidden text area and copy it.
  const area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.className = "offscreen";
  document.body.appendChild(area);
  area.select();
  const done = document.execCommand("copy");
  area.remove();
  return done ? Promise.resolve() : Promise.reject(new Error("copy refused"));
}

function setupCopyButtons() {
  document.querySelectorAll("[data-copy]").forEach(function (button) {
    button.addEventListener("click", function () {
      const id = button.getAttribute("data-copy");
      const source = document.getElementById(id);
      const status = document.querySelector('[data-copied-for="' + id + '"]');
      copyText(source ? source.textContent : "").then(
        function () { if (status) status.textContent = "Copied."; },
        function () { if (status) status.textContent = "Copy failed: select the text and copy it."; }
      );
    });
  });
}

const SVG = "http://www.w3.org/2000/svg";

function drawChart(svg, minutes) {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const max = Math.max(1, ...minutes.map(function (m) { return m.calls; }));
  const step = 600 / Math.max(1, minutes.length);
  minutes.forEach(function (m, i) {
    const h = Math.round((m.calls * 150) / max);
    const bar = document.createElementNS(SVG, "rect");
    bar.setAttribute("class", "bar");
    bar.setAttribute("x", String(i * step));
    bar.setAttribute("y", String(160 - h));
    bar.setAttribute("width", String(Math.max(1, step - 2)));
    bar.setAttribute("height", String(h));
    const title = document.createElementNS(SVG, "title");
    title.textContent = new Date(m.start * 1000).toISOString().slice(11, 16) + " UTC: " + m.calls + " calls";
    bar.appendChild(title);
    svg.appendChild(bar);
  });
}

function setupLive() {
  const live = document.getElementById("live");
  if (!live) return;
  const src = live.getAttribute("data-src");
  const chart = document.getElementById("live-chart");
  function refresh() {
    fetch(src, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) { if (!r.ok) throw new Error(String(r.status)); return r.json(); })
      .then(function (figures) {
        live.querySelectorAll("[data-figure]").forEach(function (el) {
          const value = figures[el.getAttribute("data-figure")];
          if (value !== undefined) el.textContent = String(value);
        });
        if (chart && figures.minutes) drawChart(chart, figures.minutes);
        live.setAttribute("data-updated", String(Date.now()));
      })
      .catch(function () { live.setAttribute("data-stale", "true"); });
  }
  refresh();
  setInterval(refresh, 2000);
}

document.addEventListener("DOMContentLoaded", function () {
  setupCopyButtons();
  setupLive();
});
