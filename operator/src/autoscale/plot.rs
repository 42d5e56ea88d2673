//! `simulate --plot FILE.png`: demand, the forecast and each scaling policy's ready capacity
//! over the trace, drawn into a small raster and written as a PNG — with its own encoder
//! (palette colours, stored deflate blocks) and a 5×7 font for the labels, so the operator
//! takes on no imaging dependency for one picture.

use super::simulate::Report;

const WIDTH: usize = 1400;
const HEIGHT: usize = 560;
const LEFT: usize = 80;
const RIGHT: usize = 20;
const TOP: usize = 50;
const BOTTOM: usize = 60;

/// Palette indices.
const WHITE: u8 = 0;
const BLACK: u8 = 1;
const GRID: u8 = 2;
const DEMAND: u8 = 3;
const FORECAST: u8 = 4;
const PREDICTIVE: u8 = 5;
const REACTIVE: u8 = 6;
const PALETTE: [[u8; 3]; 7] = [
    [255, 255, 255],
    [30, 30, 30],
    [225, 225, 225],
    [120, 120, 120],
    [240, 140, 20],
    [30, 140, 60],
    [200, 40, 40],
];

/// A raster of palette indices.
struct Canvas {
    pixels: Vec<u8>,
}

impl Canvas {
    fn new() -> Self {
        Self {
            pixels: vec![WHITE; WIDTH * HEIGHT],
        }
    }

    fn set(&mut self, x: i64, y: i64, colour: u8) {
        if (0..WIDTH as i64).contains(&x) && (0..HEIGHT as i64).contains(&y) {
            self.pixels[y as usize * WIDTH + x as usize] = colour;
        }
    }

    /// Bresenham, `thick` pixels wide downward.
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), colour: u8, thick: i64) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            for t in 0..thick {
                self.set(x, y + t, colour);
            }
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// `text` at (x, y), its top left, each font pixel `scale` wide.
    fn text(&mut self, x: i64, y: i64, text: &str, colour: u8, scale: i64) {
        for (i, c) in text.chars().enumerate() {
            let Some(rows) = glyph(c) else { continue };
            let left = x + i as i64 * 6 * scale;
            for (row, bits) in rows.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0b10000 >> col) != 0 {
                        for (a, b) in (0..scale).flat_map(|a| (0..scale).map(move |b| (a, b))) {
                            self.set(left + col * scale + a, y + row as i64 * scale + b, colour);
                        }
                    }
                }
            }
        }
    }
}

/// The 5×7 glyph of `c` (lower case for upper), rows top to bottom, bit 4 leftmost.
fn glyph(c: char) -> Option<[u8; 7]> {
    Some(match c.to_ascii_lowercase() {
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
        'a' => [0, 0, 14, 1, 15, 17, 15],
        'b' => [16, 16, 22, 25, 17, 17, 30],
        'c' => [0, 0, 14, 16, 16, 17, 14],
        'd' => [1, 1, 13, 19, 17, 17, 15],
        'e' => [0, 0, 14, 17, 31, 16, 14],
        'f' => [6, 9, 8, 28, 8, 8, 8],
        'g' => [0, 0, 15, 17, 15, 1, 14],
        'h' => [16, 16, 22, 25, 17, 17, 17],
        'i' => [4, 0, 12, 4, 4, 4, 14],
        'j' => [2, 0, 6, 2, 2, 18, 12],
        'k' => [16, 16, 18, 20, 24, 20, 18],
        'l' => [12, 4, 4, 4, 4, 4, 14],
        'm' => [0, 0, 26, 21, 21, 17, 17],
        'n' => [0, 0, 22, 25, 17, 17, 17],
        'o' => [0, 0, 14, 17, 17, 17, 14],
        'p' => [0, 0, 30, 17, 30, 16, 16],
        'q' => [0, 0, 15, 17, 15, 1, 1],
        'r' => [0, 0, 22, 25, 16, 16, 16],
        's' => [0, 0, 14, 16, 14, 1, 30],
        't' => [8, 8, 28, 8, 8, 9, 6],
        'u' => [0, 0, 17, 17, 17, 19, 13],
        'v' => [0, 0, 17, 17, 17, 10, 4],
        'w' => [0, 0, 17, 17, 21, 21, 10],
        'x' => [0, 0, 17, 10, 4, 10, 17],
        'y' => [0, 0, 17, 17, 15, 1, 14],
        'z' => [0, 0, 31, 2, 4, 8, 31],
        '.' => [0, 0, 0, 0, 0, 12, 12],
        ',' => [0, 0, 0, 0, 12, 4, 8],
        ':' => [0, 12, 12, 0, 12, 12, 0],
        '/' => [0, 1, 2, 4, 8, 16, 0],
        '+' => [0, 4, 4, 31, 4, 4, 0],
        '-' => [0, 0, 0, 31, 0, 0, 0],
        '%' => [24, 25, 2, 4, 8, 19, 3],
        '(' => [2, 4, 8, 8, 8, 4, 2],
        ')' => [8, 4, 2, 2, 2, 4, 8],
        '_' => [0, 0, 0, 0, 0, 0, 31],
        ' ' => [0; 7],
        _ => return None,
    })
}

/// A round step for about `ticks` ticks over `span`.
fn tick_step(span: f64, ticks: f64) -> f64 {
    let raw = (span / ticks).max(1e-9);
    let magnitude = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|step| *step >= raw)
        .unwrap_or(10.0 * magnitude)
}

/// The picture: demand, the predictive+reactive policy's forecast and ready capacity, and the
/// reactive policy's ready capacity, against hours; `title` on top.
pub fn draw(reports: &[Report], title: &str) -> Vec<u8> {
    let by_name = |name: &str| reports.iter().find(|r| r.policy == name);
    let predictive = by_name("predictive+reactive");
    let reactive = by_name("reactive");
    let timeline = predictive
        .or(reactive)
        .map(|r| r.timeline.as_slice())
        .unwrap_or_default();
    let mut canvas = Canvas::new();
    let end = timeline.last().map_or(1.0, |p| p.t).max(1.0);
    let top = predictive
        .into_iter()
        .chain(reactive)
        .flat_map(|r| &r.timeline)
        .flat_map(|p| [p.demand, p.capacity, p.forecast.unwrap_or(0.0)])
        .fold(0.0, f64::max)
        .max(1e-9)
        * 1.05;
    let (plot_w, plot_h) = (
        (WIDTH - LEFT - RIGHT) as f64,
        (HEIGHT - TOP - BOTTOM) as f64,
    );
    let at = |t: f64, v: f64| {
        (
            LEFT as i64 + (t / end * plot_w) as i64,
            (TOP as f64 + plot_h - v / top * plot_h) as i64,
        )
    };
    // Grid, ticks and axes.
    let hours = end / 3600.0;
    let hour_step = tick_step(hours, 12.0);
    let mut h = 0.0;
    while h <= hours + 1e-9 {
        let (x, _) = at(h * 3600.0, 0.0);
        canvas.line((x, TOP as i64), (x, (HEIGHT - BOTTOM) as i64), GRID, 1);
        let label = format!("{}", (h * 100.0).round() / 100.0);
        canvas.text(
            x - 3 * label.len() as i64,
            (HEIGHT - BOTTOM + 8) as i64,
            &label,
            BLACK,
            1,
        );
        h += hour_step;
    }
    let rate_step = tick_step(top, 8.0);
    let mut v = 0.0;
    while v <= top {
        let (_, y) = at(0.0, v);
        canvas.line((LEFT as i64, y), ((WIDTH - RIGHT) as i64, y), GRID, 1);
        let label = format!("{}", (v * 100.0).round() / 100.0);
        canvas.text(
            LEFT as i64 - 8 - 6 * label.len() as i64,
            y - 3,
            &label,
            BLACK,
            1,
        );
        v += rate_step;
    }
    let (x0, y0) = at(0.0, 0.0);
    canvas.line((x0, TOP as i64), (x0, y0), BLACK, 1);
    canvas.line((x0, y0), ((WIDTH - RIGHT) as i64, y0), BLACK, 1);
    canvas.text(
        (WIDTH / 2 - 15) as i64,
        (HEIGHT - BOTTOM + 28) as i64,
        "hours",
        BLACK,
        2,
    );
    canvas.text(8, (TOP - 22) as i64, "req/s", BLACK, 2);
    canvas.text(LEFT as i64 + 60, 10, title, BLACK, 2);

    // Series: demand under everything, then capacities, the forecast on top.
    let mut series = |points: Vec<(f64, f64)>, colour: u8, thick: i64| {
        for pair in points.windows(2) {
            canvas.line(
                at(pair[0].0, pair[0].1),
                at(pair[1].0, pair[1].1),
                colour,
                thick,
            );
        }
    };
    series(
        timeline.iter().map(|p| (p.t, p.demand)).collect(),
        DEMAND,
        1,
    );
    if let Some(reactive) = reactive {
        series(
            reactive
                .timeline
                .iter()
                .map(|p| (p.t, p.capacity))
                .collect(),
            REACTIVE,
            1,
        );
    }
    if let Some(predictive) = predictive {
        series(
            predictive
                .timeline
                .iter()
                .map(|p| (p.t, p.capacity))
                .collect(),
            PREDICTIVE,
            2,
        );
        series(
            predictive
                .timeline
                .iter()
                .filter_map(|p| Some((p.t, p.forecast?)))
                .collect(),
            FORECAST,
            1,
        );
    }
    // Legend.
    let legend = [
        (DEMAND, "demand"),
        (FORECAST, "forecast (with margin)"),
        (PREDICTIVE, "capacity: predictive+reactive"),
        (REACTIVE, "capacity: reactive"),
    ];
    let mut x = (WIDTH - RIGHT) as i64 - 760;
    for (colour, name) in legend {
        canvas.line((x, 30), (x + 24, 30), colour, 3);
        canvas.text(x + 30, 27, name, BLACK, 1);
        x += 36 + 6 * name.len() as i64 + 16;
    }
    png(&canvas.pixels, WIDTH, HEIGHT)
}

/// CRC-32 (ISO-HDLC) as PNG chunks carry it.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for byte in bytes {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn adler32(bytes: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for byte in bytes {
        a = (a + u32::from(*byte)) % 65_521;
        b = (b + a) % 65_521;
    }
    (b << 16) | a
}

/// An 8-bit palette PNG of `pixels` (row-major palette indices): the rows, each behind filter
/// byte 0, in a zlib stream of stored blocks.
fn png(pixels: &[u8], width: usize, height: usize) -> Vec<u8> {
    let mut raw = Vec::with_capacity((width + 1) * height);
    for row in pixels.chunks(width) {
        raw.push(0);
        raw.extend_from_slice(row);
    }
    let mut zlib = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65_535).collect();
    for (i, block) in blocks.iter().enumerate() {
        zlib.push(u8::from(i + 1 == blocks.len()));
        let len = block.len() as u16;
        zlib.extend_from_slice(&len.to_le_bytes());
        zlib.extend_from_slice(&(!len).to_le_bytes());
        zlib.extend_from_slice(block);
    }
    zlib.extend_from_slice(&adler32(&raw).to_be_bytes());

    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8; 4], data: &[u8]| {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
    };
    let mut header = Vec::new();
    header.extend_from_slice(&(width as u32).to_be_bytes());
    header.extend_from_slice(&(height as u32).to_be_bytes());
    header.extend_from_slice(&[8, 3, 0, 0, 0]); // 8 bits, palette, deflate, filter 0, no interlace
    chunk(b"IHDR", &header);
    chunk(b"PLTE", &PALETTE.concat());
    chunk(b"IDAT", &zlib);
    chunk(b"IEND", &[]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_match_their_references() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b"IEND"), 0xAE42_6082);
        assert_eq!(adler32(b"Wikipedia"), 0x11E6_0398);
    }

    #[test]
    fn a_png_holds_its_pixels() {
        let pixels: Vec<u8> = (0..70_000u32).map(|i| (i % 7) as u8).collect();
        let file = png(&pixels, 350, 200);
        assert_eq!(&file[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&file[12..16], b"IHDR");
        assert_eq!(u32::from_be_bytes(file[16..20].try_into().unwrap()), 350);
        // The stream holds the rows verbatim in stored blocks: the first row follows the zlib
        // header, the block header and its filter byte.
        let idat = file.windows(4).position(|w| w == b"IDAT").unwrap() + 4;
        assert_eq!(&file[idat..idat + 3], &[0x78, 0x01, 0]);
        assert_eq!(file[idat + 7], 0, "filter byte");
        assert_eq!(&file[idat + 8..idat + 8 + 350], &pixels[..350]);
        assert!(file.ends_with(&[0xAE, 0x42, 0x60, 0x82]));
    }

    #[test]
    fn every_label_character_has_a_glyph() {
        for c in "0123456789 abcdefghijklmnopqrstuvwxyz.,:/+-%()_".chars() {
            assert!(glyph(c).is_some(), "{c:?}");
        }
        assert_eq!(tick_step(336.0, 12.0), 50.0);
        assert_eq!(tick_step(1.0, 12.0), 0.1);
    }
}
