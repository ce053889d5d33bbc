# ruff: noqa: E501  (the JavaScript below is kept in long lines)
"""The latent browser's stylesheet and scripts (written as style.css, index.js and viewer.js by analyze.browser).

The scripts read the data files that analyze.browser writes (data/index.js, data/tokens.js,
data/shard-<K>.js: each one `MLSAE.<name>(...)` around a JSON value) through <script src> tags, which load
from file:// and from any static web server alike (fetch() of local files is blocked in Chromium). Every
token is shown through `tok()`: control, format (bidi, zero-width), private-use, unassigned and non-ASCII
space characters become a small visible "U+XXXX" tag, and each token sits in its own bidi-isolated span.
"""

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:1.2em auto;max-width:1250px;padding:0 1em;
color:#222}
h1{font-size:1.45em;margin:.2em 0}h2{font-size:1.12em;border-bottom:1px solid #ddd;margin-top:1.5em}
h3{font-size:1em;margin:1em 0 .3em}
table{border-collapse:collapse;font-size:13px}td,th{border-bottom:1px solid #eee;padding:2px 8px;text-align:left;
vertical-align:top}th{background:#f4f4f4;position:sticky;top:0}th.s{cursor:pointer}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.muted{color:#777}.spark{font-family:monospace;letter-spacing:-1px;color:#3366aa;white-space:pre}
.ctx{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px;line-height:1.7}
.t{unicode-bidi:isolate;white-space:pre-wrap;border-radius:2px}
.t.at{outline:1.5px solid #c60}.t.ne{color:#aaa}
.u{font:9px/1 system-ui,sans-serif;background:#e6e6ef;color:#335;border:1px solid #99a;border-radius:3px;
padding:0 2px;margin:0 1px;vertical-align:1px;unicode-bidi:isolate;white-space:nowrap}
.ws{color:#99a;font-style:normal}
.tk{font-family:ui-monospace,Menlo,Consolas,monospace;white-space:pre;background:#eef1f8;border-radius:3px;
padding:0 3px;margin-right:3px;unicode-bidi:isolate}
mark{background:#ffb347;outline:1.5px solid #c60;border-radius:2px}
nav a,nav span{margin-right:1em}details{margin:.3em 0}summary{cursor:pointer}
.note{background:#fff8e1;border-left:3px solid #e0a800;padding:.3em .8em}
svg text{font-size:10px;fill:#444}svg .ax{stroke:#888;stroke-width:1}
.charts{display:flex;gap:2.2em;flex-wrap:wrap}.charts>div{min-width:0}
.pager a{margin-right:.6em}#q{font-size:15px;padding:3px 6px}
"""

# Shared helpers of both scripts: HTML escaping, token rendering, number formatting.
COMMON_JS = r"""
var MLSAE=window.MLSAE=window.MLSAE||{};
function esc(s){return String(s).replace(/[&<>"']/g,function(c){return'&#'+c.charCodeAt(0)+';'})}
var HIDDEN=/[\p{Cc}\p{Cf}\p{Co}\p{Cn}\p{Cs}\p{Zl}\p{Zp}\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]/u;
function hex(c){var h=c.codePointAt(0).toString(16).toUpperCase();while(h.length<4)h='0'+h;return'U+'+h}
function tokHtml(s,chip){var o='';for(var c of String(s)){
 if(c==='\n')o+='<i class=ws>\u21b5</i>';
 else if(c==='\t')o+='<i class=ws>\u2192</i>';
 else if(c===' '&&chip)o+='<i class=ws>\u00b7</i>';
 else if(HIDDEN.test(c))o+='<span class=u title="'+hex(c)+'">'+hex(c)+'</span>';
 else o+=esc(c)}return o}
function chip(s){return'<span class=tk>'+tokHtml(s,true)+'</span>'}
function num(v,d){if(v===null||v===undefined||!isFinite(v))return'\u2013';var s=Number(v).toPrecision(d||3);
 return s.indexOf('.')<0||s.indexOf('e')>=0?s:s.replace(/0+$/,'').replace(/\.$/,'')}
function sci(v){if(v===null||!isFinite(v))return'\u2013';if(v===0)return'0';return v.toExponential(2)}
MLSAE.onload=function(name,f){var k='_'+name;if(MLSAE[k]!==undefined)f(MLSAE[k]);else(MLSAE['_w'+name]=MLSAE['_w'+name]||[]).push(f)};
function provide(name,v){MLSAE['_'+name]=v;(MLSAE['_w'+name]||[]).forEach(function(f){f(v)})}
MLSAE.index=function(v){provide('index',v)};MLSAE.tokens=function(v){provide('tokens',v)};
MLSAE.shard=function(k,v){provide('shard'+k,v)};
"""

INDEX_JS = (
    COMMON_JS
    + r"""
MLSAE.onload('index',function(D){
 var cols=D.columns,rows=D.rows,app=document.getElementById('app'),stat=document.getElementById('static');
 var sortk=1,desc=false,shown=200,q='';
 app.innerHTML='<p><input id=q size=44 placeholder="search: a token (e.g.  the) or a latent number (e.g. #12)">'
  +' <span id=cnt class=muted></span></p><table id=lat><thead><tr>'
  +cols.map(function(c,i){return'<th class=s data-i='+i+' title="'+esc(c[1])+'">'+esc(c[0])+'</th>'}).join('')
  +'</tr></thead><tbody></tbody></table><p><button id=more>show more</button></p>';
 if(stat)stat.style.display='none';
 var box=document.getElementById('q'),tb=app.querySelector('tbody'),cnt=document.getElementById('cnt');
 function href(j){return'latents/'+Math.floor(j/D.per_shard)+'.html#'+j}
 function match(r){if(!q)return true;var m=/^#?(\d+)$/.exec(q.trim());
  if(m)return String(r[0]).indexOf(m[1])===0;var s=q.toLowerCase();
  return r[6].some(function(t){return t.toLowerCase().indexOf(s)>=0})}
 function key(r){var v=r[sortk];return v===null?(desc?-Infinity:Infinity):(typeof v==='string'?0:v)}
 function draw(){var m=/^#?(\d+)$/.exec(q.trim()),hit=rows.filter(match);
  if(m){var exact=Number(m[1]);hit.sort(function(a,b){return(b[0]===exact)-(a[0]===exact)||a[0]-b[0]})}
  else hit.sort(function(a,b){var x=key(a),y=key(b);return(desc?y-x:x-y)||a[0]-b[0]});
  cnt.textContent=hit.length+' of '+rows.length+' latents';
  tb.innerHTML=hit.slice(0,shown).map(function(r){return'<tr><td><a href="'+href(r[0])+'">'+r[0]+'</a></td>'
   +'<td class=n>'+num(r[1])+'</td><td class=n>'+num(r[2])+'</td><td class=n>'+sci(r[3])+'</td><td class=n>'
   +num(r[4])+'</td><td class=spark>'+esc(r[5])+'</td><td>'+r[6].map(chip).join('')+'</td></tr>'}).join('');
  document.getElementById('more').style.display=hit.length>shown?'':'none'}
 box.oninput=function(){q=box.value;shown=200;try{history.replaceState(null,'',q?'#q='+encodeURIComponent(q):'#')}catch(e){}draw()};
 var h=/^#q=(.*)$/.exec(location.hash);if(h){try{q=decodeURIComponent(h[1])}catch(e){q=h[1]}box.value=q}
 document.getElementById('more').onclick=function(){shown+=1000;draw()};
 app.querySelectorAll('th').forEach(function(th){th.onclick=function(){var i=+th.dataset.i;
  if(i>=5)return;desc=sortk===i?!desc:i>0;sortk=i;draw()}});
 draw();document.body.dataset.ready='1';document.body.dataset.ms=Math.round(performance.now());
});
"""
)

VIEWER_JS = (
    COMMON_JS
    + r"""
(function(){
var shard=+document.body.dataset.shard,per=+document.body.dataset.per,n=+document.body.dataset.n;
var W=+document.body.dataset.width,layers=JSON.parse(document.body.dataset.layers);
var TOK=null,S=null,width=W;
var B64='ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_';
function ids(s,w){var o=[];for(var i=0;i<s.length;i+=w){var v=0;for(var k=0;k<w;k++)v=v*64+B64.indexOf(s[i+k]);o.push(v)}return o}
function text(id){var t=TOK.t[id];return t===undefined?'<'+id+'>':t}
function shade(v,vmax){if(v===null||!(v>0))return'';var a=Math.min(1,v/vmax);return'background:rgba(255,140,0,'+(0.12+0.88*a).toFixed(2)+')'}
function ctxHtml(c,vmax){ // c = [seq,pos,layer_pos,value,start,tokens,acts]
 var t=ids(c[5],TOK.w),at=c[4],acts={};c[6].forEach(function(p){acts[p[0]]=p[1]});acts[at]=c[3];
 var lo=Math.max(0,at-width),hi=Math.min(t.length-1,at+width),o='';
 for(var i=lo;i<=hi;i++){var v=acts[i],cls='t'+(i===at?' at':'')+(v===-1?' ne':'');
  var title=v===-1?'not encoded (special token)':(v===undefined?'0':num(v,4))+' at layer '+layers[c[2]];
  o+='<span class="'+cls+'" style="'+shade(v,vmax)+'" title="'+esc(title)+'">'+tokHtml(text(t[i]),/^ +$/.test(text(t[i])))+'</span>'}
 return'<span class=ctx>'+o+'</span>'}
function exTable(L,list,vmax,withLayer){if(!list.length)return'<p class=muted>none</p>';
 return'<table><tr><th>value</th>'+(withLayer?'<th>layer</th>':'')+'<th>window:pos</th><th>context (hover a token for its activation)</th></tr>'
 +list.map(function(i){var c=L.c[i];return'<tr><td class=n>'+num(c[3],4)+'</td>'+(withLayer?'<td class=n>'+layers[c[2]]+'</td>':'')
 +'<td class=n>'+c[0]+':'+c[1]+'</td><td>'+ctxHtml(c,vmax)+'</td></tr>'}).join('')+'</table>'}
function axisBars(vals,labels,title,opt){opt=opt||{};var n=vals.length,bw=Math.max(6,Math.min(24,Math.floor(520/n))),h=110,
 left=52,w=Math.max(opt.minWidth||0,left+n*bw+10),m=0;vals.forEach(function(v){if(v>m)m=v});if(!(m>0))m=1;
 var o='<svg width="'+w+'" height="'+(h+44)+'" role="img" aria-label="'+esc(title)+'">';
 [0,0.5,1].forEach(function(f){var y=10+h-f*h;o+='<line class=ax x1="'+(left-4)+'" x2="'+left+'" y1="'+y+'" y2="'+y+'"/>'
  +'<text x="'+(left-6)+'" y="'+(y+3)+'" text-anchor=end>'+esc(opt.fmt?opt.fmt(f*m):num(f*m,2))+'</text>'});
 o+='<line class=ax x1="'+left+'" x2="'+left+'" y1=10 y2="'+(10+h)+'"/><line class=ax x1="'+left+'" x2="'+(w-5)+'" y1="'+(10+h)+'" y2="'+(10+h)+'"/>';
 var every=Math.ceil(n/24);
 vals.forEach(function(v,i){var bh=v>0?Math.max(1,v/m*h):0,x=left+i*bw+1;
  o+='<rect x="'+x+'" y="'+(10+h-bh)+'" width="'+(bw-2)+'" height="'+bh+'" fill="'+(opt.color?opt.color(i):'#4477aa')+'"><title>'+esc(labels[i]+': '+(opt.fmt?opt.fmt(v):num(v,4)))+'</title></rect>';
  if(i%every===0||opt.allLabels)o+='<text x="'+(x+bw/2-1)+'" y="'+(h+24)+'" text-anchor=middle>'+esc(opt.tick?opt.tick(i):labels[i])+'</text>'});
 o+='<text x="'+left+'" y="'+(h+40)+'">'+esc(opt.xlabel||'')+'</text></svg>';return o}
function render(){
 var j=parseInt((location.hash||'').slice(1),10);if(!(j>=shard*per&&j<Math.min(n,(shard+1)*per)))j=shard*per;
 var L=S.latents[j-shard*per],app=document.getElementById('app'),o='';
 var link=function(k,label){return k<0||k>=n?'':'<a href="'+(Math.floor(k/per)===shard?'':Math.floor(k/per)+'.html')+'#'+k+'">'+label+'</a>'};
 o+='<nav><a href="../index.html">index</a>'+link(j-1,'\u2190 latent '+(j-1))+link(j+1,'latent '+(j+1)+' \u2192')
  +'<span>context: \u00b1<select id=wsel>'+[2,4,8,12,16,24,32,48,64].filter(function(x){return x<W}).concat([W]).map(function(x){
   return'<option'+(x===width?' selected':'')+'>'+x+'</option>'}).join('')+'</select> tokens</span></nav>';
 o+='<h1>Latent '+j+'</h1>';
 if(L.x===null){app.innerHTML=o+'<p class=note>This latent never fired (value &gt; 1e-3) on the tokens streamed: it is dead there.</p>';bind();return}
 var dens=L.d,mean=L.m;
 o+='<p>E[L|J] = <b>'+num(mean)+'</b> (\u2248 layer '+layers[Math.round(mean)]+') \u00b7 Var(L|J) = <b>'+num(L.v)+'</b> \u00b7 density (mean over layers) = <b>'
  +sci(dens.reduce(function(a,b){return a+b},0)/dens.length)+'</b> \u00b7 max activation = <b>'+num(L.x,4)+'</b> \u00b7 fires on <b>'+L.f.toLocaleString()+'</b> (token, layer) vectors</p>';
 o+='<h2>Where it fires</h2><div class=charts><div>'+axisBars(L.p,layers.map(String),'P(L|J) by layer',{xlabel:'layer',allLabels:layers.length<=24})
  +'<div class=muted>P(L|J): share of its activation mass at each layer</div></div><div>'
  +axisBars(dens,layers.map(String),'firing density by layer',{fmt:sci,xlabel:'layer',allLabels:layers.length<=24})
  +'<div class=muted>firing density: fraction of tokens it fires on, per layer</div></div></div>';
 var lo=L.h[0],cnts=L.h[1],E=S.edges,labels=[],qcol=[];
 var qOf={};L.q.forEach(function(g,gi){qOf[gi]=g});
 cnts.forEach(function(c,i){var b=lo+i;labels.push(num(E[b],3)+'\u2013'+(b+1<E.length?num(E[b+1],3):'\u221e'))});
 o+='<h2>Activation histogram</h2>'+axisBars(cnts,labels,'firing (token, layer) vectors per activation bin',{fmt:function(v){return Math.round(v).toLocaleString()},
  xlabel:'activation (log-spaced bins, 8 per decade)',minWidth:420,tick:function(i){return num(E[lo+i],2)},color:function(i){
  var v=E[lo+i];for(var g=0;g<L.q.length;g++)if(v>=L.q[g][0]*(1-1e-6)&&(L.q[g][1]===null||v<L.q[g][1]*(1-1e-6)))return g%2?'#77a3d6':'#4477aa';return'#4477aa'}})
  +'<div class=muted>y: number of (token, layer) vectors whose activation falls in the bin; shades alternate between the activation-quantile groups below</div>';
 if(S.logits_note)o+='<h2>Next-token logits</h2><p class=muted>'+esc(S.logits_note)+'</p>';
 if(L.g){var g=L.g,cell=function(a,b){return ids(a,TOK.w).map(function(t,i){return'<tr><td>'+chip(text(t))+'</td><td class=n>'+(b[i]>0?'+':'')+num(b[i],3)+'</td></tr>'}).join('')};
  o+='<div class=charts><table><tr><th>promoted</th><th></th></tr>'+cell(g[0],g[1])+'</table><table><tr><th>suppressed</th><th></th></tr>'+cell(g[2],g[3])+'</table></div>'}
 o+='<h2>Top activations over all layers</h2><p class=muted>each token once, at the layer where it fires most; shading: activation at that layer / '+num(L.x,4)+'</p>'+exTable(L,L.t,L.x,true);
 o+='<h2>Examples by activation quantile</h2><p class=muted>firing (token, layer) vectors drawn at random within each group of activation bins (about 1/'+S.quantiles+' of them each), strongest first</p>';
 L.q.forEach(function(g){o+='<h3>activation '+num(g[0],3)+' \u2013 '+(g[1]===null?'\u221e':num(g[1],3))+' \u00b7 '+(100*g[2]).toFixed(1)+'\u2013'+(100*g[3]).toFixed(1)
  +'% from the top \u00b7 '+g[4].toLocaleString()+' vectors</h3>'+exTable(L,g[5],L.x,true)});
 o+='<h2>Top activations at each layer</h2><p class=muted>the '+S.layer_rows+' best at each layer holding at least '+(100*S.layer_min_p)+'% of P(L|J) (all '+S.top+' per layer, at every layer, are in examples.safetensors)</p>';
 L.l.forEach(function(r){var li=r[0];o+='<details'+(li===Math.round(mean)?' open':'')+'><summary>layer '+layers[li]+': P = '+num(L.p[li],3)
  +', density '+sci(dens[li])+', max '+num(L.c[r[1][0]][3],4)+'</summary>'+exTable(L,r[1],L.x,false)+'</details>'});
 app.innerHTML=o;bind();document.title='latent '+j;document.body.dataset.ready=String(j);window.scrollTo(0,0);
 document.body.dataset.ms=Math.round(performance.now())}
function bind(){var s=document.getElementById('wsel');if(s)s.onchange=function(){width=+s.value;render()}}
var need=2;function go(){if(--need)return;var st=document.getElementById('static');if(st)st.style.display='none';render();
 window.addEventListener('hashchange',render)}
MLSAE.onload('tokens',function(t){TOK=t;go()});MLSAE.onload('shard'+shard,function(s){S=s;go()});
})();
"""
)
