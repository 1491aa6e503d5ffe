"""engine.optim_state: one parameter's fp32 master and Adam moments, read from one engine and
written into another, on 2 real gloo ranks (ep 2), ZeRO 0/1/2, fp32 and bf16."""
import torch

from padnet_ds.engine import optim_state
from padnet_ds.engine.setup import build_engine
from tests.distributed.toy import Toy, batches, ds_config, train_steps

ROWS = 4


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)



def carry(configs):
    x, y = batches(6, ROWS, seed=torch.distributed.get_rank())
    results = {}
    for stage, bf16 in configs:
        cfg = ds_config(stage, ROWS, bf16=bf16, clip=1.0)
        src = build_engine(Toy(ep_size=2, dynamic=0.5), cfg, optimizer=adamw)
        train_steps(src, x[:3], y[:3])
        keys = optim_state.moment_keys(src)
        named = dict(src.module.named_parameters())
        state = optim_state.read_all(src, named)
        fresh = Toy(ep_size=2, dynamic=0.5, seed=5)  # other parameter values, the same masks (buffers)
        for (_, mine), (_, theirs) in zip(fresh.named_buffers(), src.module.named_buffers()):
            mine.copy_(theirs)
        dst = build_engine(fresh, cfg, optimizer=adamw)
        optim_state.prime(dst, keys, optim_state.step_count(src))
        for name, p in dst.module.named_parameters():
            optim_state.write(dst, p, state[name])
        reread = optim_state.read_all(dst, dict(dst.module.named_parameters()), keys)
        exact = all(torch.equal(reread[n].fp32, s.fp32) and all(torch.equal(reread[n].moments[k], s.moments[k])
                                                                 for k in keys) for n, s in state.items())
        # (stage 0 bf16: DeepSpeed's fp16-style optimizer takes one zero step at start-up)
        results[(stage, bf16)] = dict(keys=keys, step=(optim_state.step_count(src), optim_state.step_count(dst)),
                                      exact=exact,
                                      src=train_steps(src, x[3:], y[3:]), dst=train_steps(dst, x[3:], y[3:]))
    return results


def test_state_written_into_a_fresh_engine_continues_exactly(pool):
    configs = [(0, False), (1, False), (2, False), (0, True), (2, True)]
    for res in pool.run(carry, configs):
        for cfg, r in res.items():
            assert r["keys"] == ["exp_avg", "exp_avg_sq"], cfg
            assert r["exact"], f"{cfg}: what was written is not what is read back"
            assert r["step"][0] in (3, 4) and r["step"][0] == r["step"][1], cfg
            assert r["src"] == r["dst"], f"{cfg}: {r['src']} != {r['dst']}"
