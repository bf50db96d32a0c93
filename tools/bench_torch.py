"""The networks of `fedslm bench train` in PyTorch, for the side-by-side ratio (run by the benchmark itself).

Same layers as model/src/net.rs (BasicBlocks, batch norm, global mean pooling, clinical factors concatenated
before a one-logit head; the compact stem is a 3x3 stride-2 convolution, the standard one torchvision's 7x7
stride-2 convolution and a 2x2 max-pool), the same initialisation scheme (He-normal convolutions, head uniform
in +-1/sqrt(fan-in) with a zero bias, batch norm at identity), the same batch (random crops, 40 % clinical
indicators, alternate labels), AdamW lr 5e-3 weight decay 1e-2 and a mean BCE with logits.

usage: python bench_torch.py --threads N --steps S --warmup W --batch B NET [NET ...]
NET = name:in_channels:input_size:width:depth:stem:clinical (stem compact or standard). Prints one JSON line
per network: medians in milliseconds of the forward pass (with the loss), backward pass, optimiser step, whole
training step, and inference (eval mode, no grad), and the process's peak RSS in MiB so far.
"""

import argparse
import json
import resource
import statistics
import time

import torch
import torch.nn as nn

BLOCKS = {10: [1, 1, 1, 1], 18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class Net(nn.Module):
    def __init__(self, cin, width, depth, stem, clinical):
        super().__init__()
        kernel = 3 if stem == "compact" else 7
        self.conv1 = nn.Conv2d(cin, width, kernel, 2, kernel // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = stem == "standard"
        layers, c = [], width
        for stage, n in enumerate(BLOCKS[depth]):
            cout = width << stage
            for b in range(n):
                layers.append(Block(c, cout, 2 if stage > 0 and b == 0 else 1))
                c = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c + clinical, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        bound = 1.0 / (c + clinical) ** 0.5
        nn.init.uniform_(self.fc.weight, -bound, bound)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x, clinical):
        x = torch.relu(self.bn1(self.conv1(x)))
        if self.maxpool:
            x = nn.functional.max_pool2d(x, 2)
        x = self.layers(x).mean((2, 3))
        if clinical is not None:
            x = torch.cat([x, clinical], 1)
        return self.fc(x).squeeze(1)


def peak_rss_mib():
    # VmHWM is this process's own high-water mark (ru_maxrss can include the parent's memory before exec).
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def ms(values):
    return 1e3 * statistics.median(values)


def bench(spec, steps, warmup, batch):
    name, cin, size, width, depth, stem, clinical = spec.split(":")
    cin, size, width, depth, clinical = int(cin), int(size), int(width), int(depth), int(clinical)
    torch.manual_seed(1)
    net = Net(cin, width, depth, stem, clinical)
    opt = torch.optim.AdamW(net.parameters(), lr=5e-3, weight_decay=1e-2)
    x = torch.randn(batch, cin, size, size)
    c = (torch.rand(batch, clinical) < 0.4).float() if clinical else None
    y = (torch.arange(batch) % 2 == 0).float()
    loss_fn = nn.BCEWithLogitsLoss()
    phases = {k: [] for k in ["forward", "backward", "optimiser", "step", "inference"]}
    for i in range(warmup + steps):
        net.train()
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = loss_fn(net(x, c), y)
        loss.item()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        net.eval()
        with torch.no_grad():
            torch.sigmoid(net(x, c)).tolist()
        t4 = time.perf_counter()
        if i >= warmup:
            for k, v in zip(phases, [t1 - t0, t2 - t1, t3 - t2, t3 - t0, t4 - t3]):
                phases[k].append(v)
    out = {k: ms(v) for k, v in phases.items()}
    out["name"] = name
    out["peak_rss_mib"] = peak_rss_mib()
    out["torch"] = torch.__version__
    out["threads"] = torch.get_num_threads()
    print(json.dumps(out), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("nets", nargs="+")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    for spec in a.nets:
        bench(spec, a.steps, a.warmup, a.batch)


if __name__ == "__main__":
    main()
