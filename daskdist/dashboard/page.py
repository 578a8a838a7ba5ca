"""The ``/daskdist`` page on the scheduler's dashboard, and the JSON it reads.

Routes (in the form the setting ``distributed.scheduler.http.routes`` takes):

- ``/daskdist``: the page — a run picker and live plots, redrawn every second;
- ``/daskdist/runs.json``: the runs the scheduler knows, newest first;
- ``/daskdist/runs/<run>.json``: one run's start event, rounds and epochs.

The page is plain HTML with inline SVG drawn by a few lines of JavaScript, so
it needs nothing from the internet.
"""

from __future__ import annotations

import json

from distributed.http.utils import RequestHandler

from .events import MONITOR

__all__ = ["routes", "PAGE"]


def _monitor(scheduler):
    return scheduler.plugins.get(MONITOR)


class _JSONHandler(RequestHandler):
    def _send(self, payload) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.write(json.dumps(payload))


class PageHandler(RequestHandler):
    """Serves the page."""

    def get(self):
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.write(PAGE)


class RunsHandler(_JSONHandler):
    """Serves the list of runs."""

    def get(self):
        monitor = _monitor(self.server)
        self._send({"monitor": monitor is not None,
                    "runs": monitor.summary() if monitor is not None else []})


class RunHandler(_JSONHandler):
    """Serves one run."""

    def get(self, run_id):
        monitor = _monitor(self.server)
        data = monitor.data(run_id) if monitor is not None else None
        if data is None:
            self.set_status(404)
            data = {"error": f"no run {run_id!r} on this scheduler"}
        self._send(data)


#: The page's routes: ``(pattern, handler, kwargs)``.
routes = [
    ("daskdist", PageHandler, {}),
    ("daskdist/runs.json", RunsHandler, {}),
    (r"daskdist/runs/([0-9a-zA-Z_-]+)\.json", RunHandler, {}),
]

PAGE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>daskdist training</title>
<style>
 body{font:14px system-ui,sans-serif;margin:16px;color:#222;background:#fafafa}
 h1{font-size:20px;margin:0 0 8px} #meta{margin:6px 0 12px;color:#444}
 .grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(470px,1fr));gap:12px}
 .card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px}
 .card h2{font-size:14px;margin:0 0 4px} .none{color:#888;font-style:italic;padding:40px 0}
 .legend span{margin-right:10px;font-size:12px} svg text{font-size:10px;fill:#555}
</style></head><body>
<h1>daskdist training</h1>
<label>Run: <select id="run"></select></label> <span id="status"></span>
<div id="meta"></div>
<div id="membership"></div>
<div class="grid" id="charts"></div>
<script>
const COLORS=["#1f77b4","#ff7f0e","#2ca02c","#d62728","#9467bd","#8c564b","#e377c2",
              "#7f7f7f","#bcbd22","#17becf"];
const CHARTS=[["loss","Global loss per round","round","loss"],
 ["epochs","Loss per epoch","epoch","loss"],
 ["replicas","Replicas per epoch (workers joining and leaving)","epoch","replicas"],
 ["replica-loss","Loss per replica","round","loss"],
 ["replica-rate","Samples/s per replica","round","samples/s"],
 ["staleness","Staleness of each update","round","rounds"],
 ["bytes","Bytes sent per round","round","bytes"],
 ["time","Synchronisation and compute time per round","round","seconds"]];
let chosen=new URLSearchParams(location.search).get("run");
const charts=document.getElementById("charts");
for(const [id,title] of CHARTS){charts.insertAdjacentHTML("beforeend",
 `<div class="card" id="card-${id}"><h2>${title}</h2><div class="body"></div></div>`);}
function fmt(v){const a=Math.abs(v);if(a>=1e6)return(v/1e6).toFixed(1)+"M";
 if(a>=1e3)return(v/1e3).toFixed(1)+"k";if(Number.isInteger(v))return String(v);
 if(a>=1)return v.toFixed(a>=100?0:2);return v.toPrecision(2);}
function draw(id,series,xlabel,ylabel,none){
 const body=document.querySelector(`#card-${id} .body`);
 const pts=series.flatMap(s=>s.points);
 if(!pts.length){body.innerHTML=`<div class="none">${none||"no data yet"}</div>`;return;}
 const W=460,H=200,L=48,R=8,T=8,B=28;
 let x0=Math.min(...pts.map(p=>p[0])),x1=Math.max(...pts.map(p=>p[0]));
 let y0=Math.min(0,...pts.map(p=>p[1])),y1=Math.max(...pts.map(p=>p[1]));
 if(x1==x0)x1=x0+1; if(y1==y0)y1=y0+1;
 const sx=x=>L+(x-x0)/(x1-x0)*(W-L-R), sy=y=>H-B-(y-y0)/(y1-y0)*(H-T-B);
 let svg=`<svg width="${W}" height="${H}" role="img">`;
 svg+=`<line x1="${L}" y1="${H-B}" x2="${W-R}" y2="${H-B}" stroke="#999"/>`;
 svg+=`<line x1="${L}" y1="${T}" x2="${L}" y2="${H-B}" stroke="#999"/>`;
 const whole=pts.every(p=>Number.isInteger(p[0]));
 for(const f of [0,0.5,1]){const y=y0+f*(y1-y0),x=whole?Math.round(x0+f*(x1-x0)):x0+f*(x1-x0);
  svg+=`<text x="${L-4}" y="${sy(y)+3}" text-anchor="end">${fmt(y)}</text>`;
  svg+=`<text x="${sx(x)}" y="${H-B+12}" text-anchor="middle">${fmt(x)}</text>`;}
 svg+=`<text x="${(W+L)/2}" y="${H-2}" text-anchor="middle">${xlabel}</text>`;
 svg+=`<text x="10" y="${(H-B)/2}" transform="rotate(-90 10 ${(H-B)/2})" `+
      `text-anchor="middle">${ylabel}</text>`;
 series.forEach((s,i)=>{const c=COLORS[i%COLORS.length];
  const p=s.points.map(q=>`${sx(q[0]).toFixed(1)},${sy(q[1]).toFixed(1)}`).join(" ");
  const extra=s.replica===undefined?"":` data-replica="${s.replica}"`;
  svg+=`<polyline class="series" data-series="${s.name}"${extra} `+
       `data-points="${s.points.length}" fill="none" stroke="${c}" stroke-width="1.5" `+
       `points="${p}"/>`;
  if(s.points.length==1){const q=s.points[0];
   svg+=`<circle cx="${sx(q[0])}" cy="${sy(q[1])}" r="3" fill="${c}"/>`;}});
 svg+="</svg>";
 const legend=series.map((s,i)=>`<span style="color:${COLORS[i%COLORS.length]}">&#9632; `+
  `${s.name}</span>`).join("");
 body.innerHTML=svg+`<div class="legend">${legend}</div>`;}
function line(name,rows,fx,fy,extra){const points=[];for(const r of rows){const y=fy(r);
 if(y!==null&&y!==undefined&&isFinite(y))points.push([fx(r),y]);}
 return Object.assign({name,points},extra||{});}
function perReplica(rounds,value){const by={};
 for(const r of rounds)for(const row of r.per_replica||[]){const [k]=row;
  (by[k]=by[k]||[]).push([r.round,value(row)]);}
 return Object.keys(by).sort((a,b)=>a-b).map(k=>({name:"replica "+k,replica:Number(k),
  points:by[k].filter(p=>p[1]!==null&&isFinite(p[1]))}));}
function render(run){
 const rounds=run.rounds, start=run.start||{};
 document.getElementById("meta").textContent=[start.name,start.strategy&&
  `strategy ${start.strategy}`,start.replicas&&`${start.replicas} replicas on `+
  `${start.workers} workers`,`${rounds.length} rounds`,`${run.epochs.length} epochs`,
  run.status].filter(Boolean).join(" · ");
 draw("loss",[line("global",rounds,r=>r.round,r=>r.loss)],"round","loss");
 draw("epochs",[line("train",run.epochs,e=>e.epoch,e=>e.train_loss),
  line("valid",run.epochs,e=>e.epoch,e=>e.valid_loss)],"epoch","loss");
 draw("replicas",[line("replicas",run.epochs,e=>e.epoch,e=>e.replicas)],"epoch","replicas");
 document.getElementById("membership").textContent=run.epochs.filter(e=>e.membership)
  .map(e=>`before epoch ${e.epoch}: ${e.membership}`).join(" · ");
 draw("replica-loss",perReplica(rounds,row=>row[1]),"round","loss");
 draw("replica-rate",perReplica(rounds,row=>row[3]>0?row[2]/row[3]:null),"round","samples/s");
 const stale=rounds.filter(r=>r.staleness!==undefined);
 draw("staleness",stale.length?[line("max",stale,r=>r.round,r=>Math.max(...r.staleness))]:[],
  "round","rounds",`${start.strategy||"this strategy"} has no stale updates`);
 draw("bytes",[line("bytes",rounds,r=>r.round,r=>r.bytes)],"round","bytes");
 const sync=[],compute=[];let prev=null;
 for(const r of rounds){const span=r.t_end-(prev===null?r.t_start:prev);prev=r.t_end;
  compute.push([r.round,r.compute_s]);sync.push([r.round,Math.max(span-r.compute_s,0)]);}
 draw("time",[{name:"synchronisation",points:sync},{name:"compute",points:compute}],
  "round","seconds");}
async function refresh(){
 try{const list=await (await fetch("daskdist/runs.json",{cache:"no-store"})).json();
  const select=document.getElementById("run");
  const ids=list.runs.map(r=>r.run);
  if(!chosen||!ids.includes(chosen))chosen=ids[0];
  select.innerHTML=list.runs.map(r=>`<option value="${r.run}"${r.run==chosen?" selected":""}>`+
   `${r.name||"fit"} ${r.run} (${r.status}, ${r.rounds} rounds)</option>`).join("");
  document.getElementById("status").textContent=list.runs.length?"":
   (list.monitor?"no run yet":"no daskdist fit has run on this cluster yet");
  if(chosen){const run=await (await fetch(`daskdist/runs/${chosen}.json`,
   {cache:"no-store"})).json(); if(!run.error)render(run);}
 }catch(e){document.getElementById("status").textContent="scheduler unreachable";}
 document.body.dataset.updated=Date.now();}
document.getElementById("run").onchange=e=>{chosen=e.target.value;refresh();};
refresh();setInterval(refresh,1000);
</script></body></html>
"""
