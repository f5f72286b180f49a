#!/usr/bin/env python3
"""Prints which of the crate's top-level modules each one uses (through
`crate::name` paths, tests and comments left out) and any cycle among
them; exits 1 on a cycle. Run from the repository's top:
    tools/module-graph.py
"""
import os, re, sys
src='src'
mods={}
for root,dirs,files in os.walk(src):
    for f in files:
        if not f.endswith('.rs'): continue
        path=os.path.join(root,f)
        rel=os.path.relpath(path,src)
        top=rel.split(os.sep)[0].replace('.rs','')
        if top in ('lib','main'): continue
        mods.setdefault(top,[]).append(path)
graph={m:set() for m in mods}
for m,paths in mods.items():
    for p in paths:
        text=open(p).read()
        # drop test modules
        text=re.split(r'#\[cfg\(test\)\]\s*mod tests', text)[0]
        # drop comments
        text='\n'.join(l.split('//')[0] for l in text.splitlines())
        for r in re.findall(r'crate::(\w+)', text):
            if r in mods and r!=m: graph[m].add(r)
        # use crate::{a, b}
        for grp in re.findall(r'crate::\{([^}]*)\}', text):
            for r in re.findall(r'(\w+)', grp):
                if r in mods and r!=m: graph[m].add(r)
for m in sorted(graph): print(f"{m:10} -> {', '.join(sorted(graph[m]))}")
# cycles
def cycles():
    out=[]; color={}
    stack=[]
    def dfs(u):
        color[u]=1; stack.append(u)
        for v in graph[u]:
            if color.get(v)==1: out.append(stack[stack.index(v):]+[v])
            elif not color.get(v): dfs(v)
        stack.pop(); color[u]=2
    for m in graph:
        if not color.get(m): dfs(m)
    return out
c=cycles()
print("cycles:", c if c else "none")
sys.exit(1 if c else 0)
