//! A minimal log-log line plot written as a PNG, with no dependency: an RGB
//! canvas, a 5x7 pixel font for the labels, and a PNG encoder using stored
//! (uncompressed) deflate blocks.

use std::io::Write;

pub struct Series<'a> {
    pub name: &'a str,
    pub rgb: [u8; 3],
    /// (x, y) points, both > 0.
    pub points: Vec<(f64, f64)>,
}

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Canvas {
        Canvas {
            w,
            h,
            px: vec![255; w * h * 3],
        }
    }

    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let i = (y as usize * self.w + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3], thick: i64) {
        let n = (x1 - x0).abs().max((y1 - y0).abs()).max(1);
        for i in 0..=n {
            let x = x0 + (x1 - x0) * i / n;
            let y = y0 + (y1 - y0) * i / n;
            for dx in 0..thick {
                for dy in 0..thick {
                    self.set(x + dx - thick / 2, y + dy - thick / 2, c);
                }
            }
        }
    }

    fn text(&mut self, x: i64, y: i64, s: &str, c: [u8; 3]) {
        for (k, ch) in s.chars().enumerate() {
            let g = glyph(ch.to_ascii_uppercase());
            for (row, bits) in g.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        let (px, py) = (x + k as i64 * 12 + col * 2, y + row as i64 * 2);
                        for d in 0..4 {
                            self.set(px + d % 2, py + d / 2, c);
                        }
                    }
                }
            }
        }
    }

    fn png(&self) -> Vec<u8> {
        let mut raw = Vec::with_capacity((self.w * 3 + 1) * self.h);
        for row in self.px.chunks(self.w * 3) {
            raw.push(0); // filter: none
            raw.extend_from_slice(row);
        }
        let mut z = vec![0x78, 0x01];
        let chunks: Vec<&[u8]> = raw.chunks(65535).collect();
        for (i, b) in chunks.iter().enumerate() {
            z.push(u8::from(i + 1 == chunks.len()));
            z.extend_from_slice(&(b.len() as u16).to_le_bytes());
            z.extend_from_slice(&(!(b.len() as u16)).to_le_bytes());
            z.extend_from_slice(b);
        }
        let (mut a, mut b) = (1u32, 0u32);
        for &x in &raw {
            a = (a + u32::from(x)) % 65521;
            b = (b + a) % 65521;
        }
        z.extend_from_slice(&((b << 16) | a).to_be_bytes());
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&(self.w as u32).to_be_bytes());
        ihdr.extend_from_slice(&(self.h as u32).to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
        chunk(&mut out, b"IHDR", &ihdr);
        chunk(&mut out, b"IDAT", &z);
        chunk(&mut out, b"IEND", &[]);
        out
    }
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let mut body = kind.to_vec();
    body.extend_from_slice(data);
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc32(&body).to_be_bytes());
}

/// 5x7 glyphs (one byte per row, 5 low bits) for the characters the labels use.
fn glyph(c: char) -> [u8; 7] {
    match c {
        '0' => [14, 17, 19, 21, 25, 17, 14],
        '1' => [4, 12, 4, 4, 4, 4, 14],
        '2' => [14, 17, 1, 2, 4, 8, 31],
        '3' => [31, 2, 4, 2, 1, 17, 14],
        '4' => [2, 6, 10, 18, 31, 2, 2],
        '5' => [31, 16, 30, 1, 1, 17, 14],
        '6' => [6, 8, 16, 30, 17, 17, 14],
        '7' => [31, 1, 2, 4, 8, 8, 8],
        '8' => [14, 17, 17, 14, 17, 17, 14],
        '9' => [14, 17, 17, 15, 1, 2, 12],
        'A' => [14, 17, 17, 31, 17, 17, 17],
        'B' => [30, 17, 17, 30, 17, 17, 30],
        'C' => [14, 17, 16, 16, 16, 17, 14],
        'D' => [30, 17, 17, 17, 17, 17, 30],
        'E' => [31, 16, 16, 30, 16, 16, 31],
        'F' => [31, 16, 16, 30, 16, 16, 16],
        'G' => [14, 17, 16, 23, 17, 17, 15],
        'H' => [17, 17, 17, 31, 17, 17, 17],
        'I' => [14, 4, 4, 4, 4, 4, 14],
        'K' => [17, 18, 20, 24, 20, 18, 17],
        'L' => [16, 16, 16, 16, 16, 16, 31],
        'M' => [17, 27, 21, 21, 17, 17, 17],
        'N' => [17, 17, 25, 21, 19, 17, 17],
        'O' => [14, 17, 17, 17, 17, 17, 14],
        'P' => [30, 17, 17, 30, 16, 16, 16],
        'R' => [30, 17, 17, 30, 20, 18, 17],
        'S' => [15, 16, 16, 14, 1, 1, 30],
        'T' => [31, 4, 4, 4, 4, 4, 4],
        'U' => [17, 17, 17, 17, 17, 17, 14],
        'V' => [17, 17, 17, 17, 17, 10, 4],
        'W' => [17, 17, 17, 21, 21, 21, 10],
        'X' => [17, 17, 10, 4, 10, 17, 17],
        'Y' => [17, 17, 10, 4, 4, 4, 4],
        'Z' => [31, 1, 2, 4, 8, 16, 31],
        '.' => [0, 0, 0, 0, 0, 12, 12],
        ',' => [0, 0, 0, 0, 12, 4, 8],
        ':' => [0, 12, 12, 0, 12, 12, 0],
        '-' => [0, 0, 0, 31, 0, 0, 0],
        '/' => [0, 1, 2, 4, 8, 16, 0],
        '(' => [2, 4, 8, 8, 8, 4, 2],
        ')' => [8, 4, 2, 2, 2, 4, 8],
        '%' => [24, 25, 2, 4, 8, 19, 3],
        '=' => [0, 0, 31, 0, 31, 0, 0],
        _ => [0; 7],
    }
}

/// Writes a log-log plot of `series` to `path`. `xlabel(x)` names an x
/// tick (one per point of the first series); y ticks are decades.
pub fn loglog(
    path: &str,
    title: &str,
    ylabel: &str,
    series: &[Series],
    xlabel: impl Fn(f64) -> String,
) -> std::io::Result<()> {
    let (w, h) = (900usize, 560usize);
    let (l, r, t, b) = (110i64, 40i64, 60i64, 80i64);
    let mut c = Canvas::new(w, h);
    let pts = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let (ly0, ly1) = (
        y0.log10().floor(),
        y1.log10().ceil().max(y0.log10().floor() + 1.0),
    );
    let (lx0, lx1) = (x0.log2(), x1.log2().max(x0.log2() + 1.0));
    let px = |x: f64| l + ((x.log2() - lx0) / (lx1 - lx0) * (w as i64 - l - r) as f64) as i64;
    let py = |y: f64| {
        h as i64 - b - ((y.log10() - ly0) / (ly1 - ly0) * (h as i64 - t - b) as f64) as i64
    };
    let grey = [210, 210, 210];
    let black = [0, 0, 0];
    let mut d = ly0;
    while d <= ly1 {
        let y = py(10f64.powf(d));
        c.line((l, y), (w as i64 - r, y), grey, 1);
        let label = if d >= 0.0 {
            format!("{}", 10f64.powf(d))
        } else {
            format!("{:.*}", (-d) as usize, 10f64.powf(d))
        };
        c.text(l - 10 - 12 * label.len() as i64, y - 7, &label, black);
        d += 1.0;
    }
    if let Some(s) = series.first() {
        for &(x, _) in &s.points {
            let xp = px(x);
            c.line((xp, t), (xp, h as i64 - b), grey, 1);
            let label = xlabel(x);
            c.text(
                xp - 6 * label.len() as i64,
                h as i64 - b + 12,
                &label,
                black,
            );
        }
    }
    c.line((l, h as i64 - b), (w as i64 - r, h as i64 - b), black, 2);
    c.line((l, t), (l, h as i64 - b), black, 2);
    c.text(l, 20, title, black);
    c.text(l, h as i64 - 30, ylabel, black);
    for (k, s) in series.iter().enumerate() {
        for p in s.points.windows(2) {
            c.line((px(p[0].0), py(p[0].1)), (px(p[1].0), py(p[1].1)), s.rgb, 3);
        }
        for &(x, y) in &s.points {
            for d in -4..=4 {
                c.line((px(x) - 4, py(y) + d), (px(x) + 4, py(y) + d), s.rgb, 1);
            }
        }
        let ly = t + 10 + 24 * k as i64;
        c.line(
            (w as i64 - r - 260, ly + 6),
            (w as i64 - r - 220, ly + 6),
            s.rgb,
            4,
        );
        c.text(w as i64 - r - 210, ly, s.name, black);
    }
    std::fs::File::create(path)?.write_all(&c.png())
}
