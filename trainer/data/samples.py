"""
Small texts of different kinds for `nanochat tok eval`: how many bytes each token covers, per kind.

Notable:
- a few KB each, written for this project (no licensed text), so the table needs no download
- the kinds differ in what a BPE trained on one corpus has seen: English prose, Python code,
  math in LaTeX, and Korean (Hangul is 3 bytes per character in UTF-8, so an unseen script shows up
  as bytes/token close to 1)
"""

ENGLISH = """\
The lighthouse keeper kept a notebook on the table beside the lamp, and every evening, before the
light was lit, he wrote down three things: the direction of the wind, the colour of the sea, and the
name of any ship he had seen pass during the day. Most days there was nothing to write under the third
heading. The island lay far from the shipping lanes, and the vessels that came near were small fishing
boats from the harbour on the mainland, whose names he had long since learned by heart.

He had not chosen the island. The position had been offered to him after the war, when work of any
kind was hard to find, and he had accepted it because the letter promised a house, a salary paid every
quarter, and a supply boat once a fortnight. He had expected to stay a year, perhaps two. Thirty-one
years later he was still there, and the notebooks filled a whole shelf in the room where he slept.

People on the mainland assumed that he was lonely. When the supply boat came, the young men who
unloaded the crates would ask him, half joking, whether he talked to the gulls. He would smile and
say that the gulls were poor conversationalists, which was true, but he never tried to explain that
loneliness was not quite the right word for what he felt. The island was quiet, but it was never
silent. The wind moved through the grass on the headland; the sea worked at the rocks below the
tower; at night the great lens turned above him with a sound like a slow breath.

In the winter of his thirty-second year the company wrote to say that the light would be automated.
An engineer would come in the spring to install the new equipment, and after that a keeper would no
longer be needed. The letter thanked him for his long service and mentioned a pension. He read it
twice, folded it, and put it inside the cover of the current notebook. That evening, under the third
heading, he wrote: no ships today. Then, after a moment, he added a line he had never written before:
the island will be here after I am gone, and so will the sea, and so, I suppose, will the light.

The engineer arrived in April, a careful young woman who asked a great many questions and wrote the
answers down in a notebook of her own. She wanted to know how often the lens had to be cleaned, which
windows leaked in an easterly gale, and where the cable from the generator ran beneath the floor. On
her last evening she asked whether she might read some of the old notebooks, and he took down the
first one from the shelf and handed it to her without a word. She read until the light was lit, and
then she read by the light itself, turning the pages slowly, as if she were listening to them.
"""

PYTHON = '''\
"""A small job queue with retries, priorities and a deadline per job."""

from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass(order=True)
class Job:
    priority: int
    seq: int
    name: str = field(compare=False)
    run: Callable[[], object] = field(compare=False)
    attempts: int = field(default=0, compare=False)
    deadline: float | None = field(default=None, compare=False)


class JobQueue:
    """Runs the most urgent job first; a failed job goes back with a lower priority."""

    def __init__(self, max_attempts: int = 3, clock: Callable[[], float] = time.monotonic):
        self._heap: list[Job] = []
        self._seq = itertools.count()
        self.max_attempts = max_attempts
        self.clock = clock
        self.failed: dict[str, Exception] = {}
        self.results: dict[str, object] = {}

    def submit(self, name: str, run: Callable[[], object], priority: int = 0, timeout: float | None = None) -> None:
        deadline = None if timeout is None else self.clock() + timeout
        heapq.heappush(self._heap, Job(priority, next(self._seq), name, run, deadline=deadline))

    def __len__(self) -> int:
        return len(self._heap)

    def step(self) -> str | None:
        """Run one job; returns its name, or None when the queue is empty."""
        if not self._heap:
            return None
        job = heapq.heappop(self._heap)
        if job.deadline is not None and self.clock() > job.deadline:
            self.failed[job.name] = TimeoutError(f"{job.name} missed its deadline")
            return job.name
        job.attempts += 1
        try:
            self.results[job.name] = job.run()
        except Exception as e:  # noqa: BLE001 - any failure is retried the same way
            if job.attempts >= self.max_attempts:
                self.failed[job.name] = e
            else:
                job.priority += 1  # back of the line among equals
                heapq.heappush(self._heap, job)
        return job.name

    def drain(self) -> dict[str, object]:
        while self.step() is not None:
            pass
        return self.results


def parse_duration(text: str) -> float:
    """'1h30m', '45s', '2m5s' -> seconds."""
    units = {"h": 3600, "m": 60, "s": 1}
    total, number = 0.0, ""
    for char in text.strip():
        if char.isdigit() or char == ".":
            number += char
        elif char in units and number:
            total += float(number) * units[char]
            number = ""
        else:
            raise ValueError(f"bad duration {text!r}")
    if number:
        raise ValueError(f"missing unit at the end of {text!r}")
    return total


if __name__ == "__main__":
    queue = JobQueue()
    queue.submit("fast", lambda: sum(range(10)), priority=0)
    queue.submit("slow", lambda: parse_duration("1h30m"), priority=1)
    print(queue.drain())
'''

MATH = r"""\
\section{The Gaussian integral}

Let $I = \int_{-\infty}^{\infty} e^{-x^2}\,dx$. Squaring and switching to polar coordinates,
\begin{align}
I^2 &= \int_{-\infty}^{\infty}\int_{-\infty}^{\infty} e^{-(x^2+y^2)}\,dx\,dy
     = \int_{0}^{2\pi}\int_{0}^{\infty} e^{-r^2}\, r\,dr\,d\theta \\
    &= 2\pi \left[ -\tfrac{1}{2} e^{-r^2} \right]_{0}^{\infty} = \pi,
\end{align}
so $I = \sqrt{\pi}$. More generally, for $a > 0$ and $b \in \mathbb{R}$,
\[
  \int_{-\infty}^{\infty} e^{-a x^2 + b x}\,dx = \sqrt{\frac{\pi}{a}}\, \exp\!\left(\frac{b^2}{4a}\right).
\]

\begin{theorem}[Cauchy--Schwarz]
For vectors $u, v$ in an inner product space, $|\langle u, v\rangle|^2 \le \langle u, u\rangle \langle v, v\rangle$,
with equality if and only if $u$ and $v$ are linearly dependent.
\end{theorem}

\begin{proof}
If $v = 0$ both sides vanish. Otherwise let $\lambda = \langle u, v\rangle / \langle v, v\rangle$ and
expand $0 \le \| u - \lambda v \|^2 = \|u\|^2 - |\langle u, v\rangle|^2 / \|v\|^2$.
\end{proof}

\subsection{Series}
For $|x| < 1$ we have $\sum_{n=0}^{\infty} x^n = \frac{1}{1-x}$; differentiating term by term gives
$\sum_{n=1}^{\infty} n x^{n-1} = (1-x)^{-2}$. The Basel problem asks for $\zeta(2) = \sum_{n \ge 1} n^{-2}$,
and Euler's answer $\zeta(2) = \pi^2/6$ follows from comparing the coefficients of $x^2$ in
\[
  \frac{\sin x}{x} = \prod_{n=1}^{\infty}\left(1 - \frac{x^2}{n^2\pi^2}\right)
  = 1 - \frac{x^2}{3!} + \frac{x^4}{5!} - \cdots.
\]

\subsection{Linear algebra}
Let $A \in \mathbb{R}^{n \times n}$ be symmetric. Then $A = Q \Lambda Q^{\top}$ with $Q^{\top} Q = I_n$ and
$\Lambda = \operatorname{diag}(\lambda_1, \dots, \lambda_n)$, and for every $x \neq 0$
\[
  \lambda_{\min} \le \frac{x^{\top} A x}{x^{\top} x} \le \lambda_{\max}.
\]
The softmax $\sigma(z)_i = e^{z_i} / \sum_{j=1}^{K} e^{z_j}$ is invariant under $z \mapsto z + c\mathbf{1}$,
which is why implementations subtract $\max_j z_j$ before exponentiating. The cross-entropy of a
one-hot target $y$ is $\mathcal{L}(z) = -\log \sigma(z)_y$ and its gradient is
$\nabla_z \mathcal{L} = \sigma(z) - e_y$, where $e_y$ is the $y$-th standard basis vector.

\begin{equation}
  \mathbb{E}\left[(X - \mu)^2\right] = \mathbb{E}[X^2] - \mu^2, \qquad
  \Pr\left(|X - \mu| \ge k\sigma\right) \le \frac{1}{k^2}.
\end{equation}
"""

KOREAN = """\
작은 섬의 등대지기는 매일 저녁 불을 켜기 전에 등불 옆 탁자에 놓인 공책에 세 가지를 적었다.
바람의 방향, 바다의 색깔, 그리고 그날 지나간 배의 이름이었다. 대부분의 날에는 세 번째 칸에 적을
것이 없었다. 섬은 큰 항로에서 멀리 떨어져 있었고, 가까이 오는 배라고는 육지 항구에서 나온 작은
고깃배들뿐이었다. 그는 오래전에 그 배들의 이름을 모두 외워 두었다.

그가 섬을 고른 것은 아니었다. 전쟁이 끝난 뒤 일자리를 구하기 어려웠던 시절에 이 자리를 제안받았고,
집과 석 달마다 나오는 급여, 그리고 두 주에 한 번 오는 보급선을 약속한 편지를 보고 받아들였다.
일 년, 길어야 이 년쯤 머물 생각이었다. 그러나 서른한 해가 지난 지금도 그는 여전히 그곳에 있었고,
공책들은 그가 잠을 자는 방의 선반 하나를 가득 채우고 있었다.

육지 사람들은 그가 외로울 것이라고 생각했다. 보급선이 올 때면 상자를 내리던 젊은이들이 반쯤 농담으로
갈매기와 이야기를 나누느냐고 묻곤 했다. 그는 웃으며 갈매기는 말상대로는 별로라고 대답했는데, 그것은
사실이었다. 하지만 자신이 느끼는 것을 외로움이라는 말로 다 설명할 수 없다는 이야기는 한 번도 하지
않았다. 섬은 조용했지만 결코 적막하지는 않았다. 바람은 언덕 위의 풀숲을 지나갔고, 바다는 탑 아래의
바위를 쉬지 않고 두드렸으며, 밤이면 커다란 렌즈가 그의 머리 위에서 느린 숨소리 같은 소리를 내며 돌았다.

서른두 번째 해 겨울, 회사에서 등대를 자동화하겠다는 편지가 왔다. 봄에 기술자가 와서 새 장비를
설치할 것이고, 그 뒤로는 등대지기가 더 필요하지 않다는 내용이었다. 편지는 그의 오랜 근무에 감사하며
연금에 대해서도 언급했다. 그는 편지를 두 번 읽고 접어서 지금 쓰고 있는 공책의 표지 안쪽에 넣었다.
그날 저녁 세 번째 칸에 그는 이렇게 적었다. 오늘은 배가 없었다. 그리고 잠시 뒤, 한 번도 써 본 적 없는
문장을 덧붙였다. 내가 떠난 뒤에도 섬은 여기 있을 것이고, 바다도 그럴 것이며, 아마 불빛도 그럴 것이다.

기술자는 사월에 도착했다. 질문이 많은 꼼꼼한 젊은 여성이었고, 대답을 자기 공책에 하나하나 받아 적었다.
렌즈를 얼마나 자주 닦아야 하는지, 동풍이 거세게 불 때 어느 창문으로 물이 새는지, 발전기에서 나온 전선이
바닥 아래 어디로 지나가는지 알고 싶어 했다. 떠나기 전날 저녁, 그녀는 옛 공책들을 읽어 봐도 되느냐고
물었다. 그는 선반에서 첫 번째 공책을 꺼내 말없이 건네주었다. 그녀는 불이 켜질 때까지 읽었고, 그 뒤에는
등대의 불빛 아래에서, 마치 귀를 기울이듯 천천히 책장을 넘기며 계속 읽었다.
"""

# kind of text -> sample; the eval adds a held-out slice of the corpus' validation split
SAMPLES: dict[str, str] = {
    "english": ENGLISH,
    "python": PYTHON,
    "math": MATH,
    "korean": KOREAN,
}
