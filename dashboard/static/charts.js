// Draws a line chart for each element with data-chart-table="<table id>", from that table's
// numbers (the table stays on the page: every chart has its numbers available as a table).
// data-chart-columns lists the table columns (1-based after the label column) to plot.
(function () {
  "use strict";
  function draw(box) {
    if (typeof echarts === "undefined") { return; }
    var table = document.getElementById(box.getAttribute("data-chart-table"));
    if (!table) { return; }
    var heads0 = table.tHead.rows[0].cells;
    var columns = box.getAttribute("data-chart-columns") === "all"
      ? Array.prototype.slice.call(heads0, 1).map(function (_, i) { return i + 1; })
      : (box.getAttribute("data-chart-columns") || "1").split(",").map(Number);
    var oneAxis = box.getAttribute("data-chart-axis") === "one";
    var heads = table.tHead.rows[0].cells;
    var labels = [], series = columns.map(function (c) {
      return { name: heads[c].textContent.trim(), type: "line", data: [], yAxisIndex: oneAxis || c === 1 ? 0 : 1,
               smooth: true, connectNulls: false };
    });
    Array.prototype.forEach.call(table.tBodies[0].rows, function (row) {
      labels.push(row.cells[0].textContent.trim().slice(5));
      columns.forEach(function (c, i) {
        var cell = row.cells[c];
        var raw = cell.getAttribute("data-value");
        if (raw === null) { raw = cell.textContent.replace(/[^0-9.\-]/g, ""); }
        series[i].data.push(raw === "" ? null : Number(raw));
      });
    });
    var chart = echarts.init(box, null, { renderer: "svg" });
    chart.setOption({
      animation: false, tooltip: { trigger: "axis" }, legend: { top: 0 },
      grid: { left: 60, right: 60, top: 30, bottom: 30 },
      xAxis: { type: "category", data: labels },
      yAxis: [{ type: "value" }, { type: "value" }],
      series: series
    });
    window.addEventListener("resize", function () { chart.resize(); });
  }
  document.addEventListener("DOMContentLoaded", function () {
    Array.prototype.forEach.call(document.querySelectorAll("[data-chart-table]"), draw);
  });
})();
