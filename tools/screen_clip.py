#!/usr/bin/env python3
"""Writes a Y4M clip that looks like a desktop (a panel, a window of text, a box moving
across), for a headless client to share where there is no screen to show:
`python3 tools/screen_clip.py OUT.y4m [WIDTH HEIGHT FRAMES]`."""
import random
import sys

out = sys.argv[1]
width, height, frames = (int(a) for a in (sys.argv[2:5] or (1280, 720, 60)))
rng = random.Random(7)
background, panel, paper, ink, box = 110, 50, 235, 40, 160
left, right, top, bottom = width // 8, width * 5 // 8, height // 8, height * 7 // 8
GLYPH_W, GLYPH_H, LINE_H = 8, 14, 22

# A made-up alphabet: 26 glyphs of two to four strokes (stems and bars) each.
strokes = [lambda x, y: x == 0, lambda x, y: x == 5, lambda x, y: y == 0 and x < 6,
           lambda x, y: y == 6 and x < 6, lambda x, y: y == 13 and x < 6, lambda x, y: x == y // 2]
font = []
for _ in range(26):
    chosen = rng.sample(strokes, rng.randint(2, 4))
    font.append([bytes(ink if any(s(x, y) for s in chosen) else paper for x in range(GLYPH_W))
                 for y in range(GLYPH_H)])


def text_line():
    """The 14 pixel rows of one line of words across the window."""
    glyphs, x = [], 12
    while x + GLYPH_W * 10 < right - left:
        for _ in range(rng.randint(2, 9)):
            glyphs.append((x, rng.randrange(26)))
            x += GLYPH_W
        x += GLYPH_W
    rows = []
    for y in range(GLYPH_H):
        row = bytearray([paper]) * (right - left)
        for gx, g in glyphs:
            row[gx:gx + GLYPH_W] = font[g][y]
        rows.append(row)
    return rows


lines = [text_line() for _ in range((bottom - top) // LINE_H)]
with open(out, "wb") as f:
    f.write(b"YUV4MPEG2 W%d H%d F10:1 Ip A1:1 C420jpeg\n" % (width, height))
    for i in range(frames):
        luma = bytearray()
        bx = (i * 12) % (width - 80)
        for y in range(height):
            row = bytearray([panel if y < 28 else background]) * width
            if top <= y < bottom:
                line, within = divmod(y - top - 16, LINE_H)
                window = lines[line][within] if y - top >= 16 and within < GLYPH_H and line < len(lines) else None
                row[left:right] = window or bytearray([paper]) * (right - left)
            if height - 60 <= y < height - 20:
                row[bx:bx + 80] = bytearray([box]) * 80
            luma += row
        f.write(b"FRAME\n" + bytes(luma) + bytes([128]) * (2 * ((width + 1) // 2) * ((height + 1) // 2)))
