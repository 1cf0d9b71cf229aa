import asyncio, json, time, os, signal, sys
P=int(sys.argv[1])
async def post(prefer, d):
    r,w=await asyncio.open_connection('127.0.0.1',18851)
    b=json.dumps({"duration":d}).encode()
    w.write(f"POST /sessions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {len(b)}\r\n{prefer}\r\n".encode()+b)
    raw=await r.read(); w.close()
    head,_,body=raw.partition(b"\r\n\r\n")
    st=head.split(b" ")[1].decode() if head else "EOF"
    try: j=json.loads(body); code=j.get("error") or j.get("state")
    except Exception: code=body[:60]
    if isinstance(code,dict): code=code.get("error")
    return (time.monotonic()-T, st, code)
async def main():
    global T; T=time.monotonic()
    tasks=[asyncio.create_task(post("", 3)) for _ in range(12)]+[asyncio.create_task(post("Prefer: respond-async\r\n", 3)) for _ in range(6)]
    await asyncio.sleep(0.5)
    os.kill(P, signal.SIGTERM); print("SIGTERM at", round(time.monotonic()-T,2))
    await asyncio.sleep(0.2)
    tasks.append(asyncio.create_task(post("", 1)))  # arrival during drain
    for t in tasks: print([round(x,2) if isinstance(x,float) else x for x in await t])
asyncio.run(main())
