;; Block quantization (model/quantize.ts) in WebAssembly SIMD. The hottest loops (int8's, int4's refits) make no
;; calls: V8 does not inline WebAssembly functions, and a call per 4 weights cost a third of the time.
;; Every f32 product and quotient here is rounded once, as Math.fround of the double result is.
;; Blocks are whole: blockSize a multiple of 16, rows a multiple of blockSize.
;; The memory is shared and imported: helper threads (model/quant-kernels.ts, QuantPool) run the same kernels on
;; other blocks of the same chunk, each with its own `tmp`. 16384 pages (1 GiB) bound it; a chunk needs tens of MiB.
;; Regenerate model/quant-kernels.wasm.ts after an edit: npm run build:wasm.
(module
  (import "env" "memory" (memory 1 16384 shared))

  (func $inverse (param $scale f32) (result v128)
    (f32x4.splat (select (f32.div (f32.const 1) (local.get $scale)) (f32.const 0) (f32.ne (local.get $scale) (f32.const 0)))))

  ;; int8 (q8): each block with its own zero point; the same codes, scales and zero points as int8BlocksF32 /
  ;; int8BlocksF16 (model/quantize.ts), bit for bit (test/quant-kernels.test.ts). One block at a time, 4 weights a step:
  ;;   lo = min(0, block), hi = max(0, block), NaNs skipped (pmin / pmax keep the running value, as the reference's
  ;;   comparisons do); scale = fl32(fl32(hi − lo) / 255), inv = scale ? fl32(1 / scale) : 0;
  ;;   zero = clamp(roundEven(fl32(−lo · inv)), 0, 255); code = clamp(roundEven(fl32(x · inv)) + zero, 0, 255),
  ;;   where a NaN (a NaN weight, ∞ · 0) truncates to 0: code = zero, the value 0.
  ;; `width` 2: binary16 weights, widened exactly on load (infinities and NaNs too, as q4 widens them); 4: float32.
  ;; Out: bs codes per block at `codes`, a float32 scale at `scales`, a zero-point byte at `zeros`.
  (func (export "q8") (param $src i32) (param $width i32) (param $blocks i32) (param $bs i32) (param $codes i32) (param $scales i32) (param $zeros i32)
    (local $end i32) (local $p i32) (local $step i32) (local $h v128) (local $mag v128) (local $x v128)
    (local $lo v128) (local $hi v128) (local $scale f32) (local $inv v128) (local $zero v128) (local $c v128)
    (local.set $step (i32.shl (local.get $width) (i32.const 2)))
    (block $done
      (loop $block
        (br_if $done (i32.eqz (local.get $blocks)))
        (local.set $end (i32.add (local.get $src) (i32.mul (local.get $bs) (local.get $width))))
        (local.set $lo (v128.const f32x4 0 0 0 0))
        (local.set $hi (v128.const f32x4 0 0 0 0))
        (local.set $p (local.get $src))
        (loop $scan
          (if (i32.eq (local.get $width) (i32.const 2))
            (then
              (local.set $h (i32x4.extend_low_i16x8_u (v128.load64_zero (local.get $p))))
              (local.set $x (v128.or
                (i32x4.shl (v128.and (local.get $h) (v128.const i32x4 0x8000 0x8000 0x8000 0x8000)) (i32.const 16))
                (v128.bitselect
                  (i32x4.add (local.tee $mag (i32x4.shl (v128.and (local.get $h) (v128.const i32x4 0x7fff 0x7fff 0x7fff 0x7fff)) (i32.const 13))) (v128.const i32x4 0x70000000 0x70000000 0x70000000 0x70000000))
                  (f32x4.mul (local.get $mag) (v128.const f32x4 0x1p112 0x1p112 0x1p112 0x1p112))
                  (i32x4.ge_u (local.get $mag) (v128.const i32x4 0x0f800000 0x0f800000 0x0f800000 0x0f800000))))))
            (else (local.set $x (v128.load (local.get $p)))))
          (local.set $lo (f32x4.pmin (local.get $lo) (local.get $x)))
          (local.set $hi (f32x4.pmax (local.get $hi) (local.get $x)))
          (local.set $p (i32.add (local.get $p) (local.get $step)))
          (br_if $scan (i32.lt_u (local.get $p) (local.get $end))))
        (local.set $lo (f32x4.pmin (local.get $lo) (i8x16.shuffle 8 9 10 11 12 13 14 15 0 1 2 3 4 5 6 7 (local.get $lo) (local.get $lo))))
        (local.set $lo (f32x4.pmin (local.get $lo) (i8x16.shuffle 4 5 6 7 0 1 2 3 4 5 6 7 0 1 2 3 (local.get $lo) (local.get $lo))))
        (local.set $hi (f32x4.pmax (local.get $hi) (i8x16.shuffle 8 9 10 11 12 13 14 15 0 1 2 3 4 5 6 7 (local.get $hi) (local.get $hi))))
        (local.set $hi (f32x4.pmax (local.get $hi) (i8x16.shuffle 4 5 6 7 0 1 2 3 4 5 6 7 0 1 2 3 (local.get $hi) (local.get $hi))))
        (local.set $scale (f32.div (f32.sub (f32x4.extract_lane 0 (local.get $hi)) (f32x4.extract_lane 0 (local.get $lo))) (f32.const 255)))
        (f32.store (local.get $scales) (local.get $scale))
        (local.set $inv (call $inverse (local.get $scale)))
        ;; the zero point: lane 0 of roundEven(−lo · inv) (a NaN truncates to 0), clamped to 0…255
        (local.set $zero (i32x4.splat (i32x4.extract_lane 0
          (i32x4.trunc_sat_f32x4_s (f32x4.nearest (f32x4.mul (f32x4.neg (local.get $lo)) (local.get $inv)))))))
        (local.set $zero (i32x4.min_s (i32x4.max_s (local.get $zero) (v128.const i32x4 0 0 0 0)) (v128.const i32x4 255 255 255 255)))
        (i32.store8 (local.get $zeros) (i32x4.extract_lane 0 (local.get $zero)))
        (local.set $p (local.get $src))
        (loop $quant
          (if (i32.eq (local.get $width) (i32.const 2))
            (then
              (local.set $h (i32x4.extend_low_i16x8_u (v128.load64_zero (local.get $p))))
              (local.set $x (v128.or
                (i32x4.shl (v128.and (local.get $h) (v128.const i32x4 0x8000 0x8000 0x8000 0x8000)) (i32.const 16))
                (v128.bitselect
                  (i32x4.add (local.tee $mag (i32x4.shl (v128.and (local.get $h) (v128.const i32x4 0x7fff 0x7fff 0x7fff 0x7fff)) (i32.const 13))) (v128.const i32x4 0x70000000 0x70000000 0x70000000 0x70000000))
                  (f32x4.mul (local.get $mag) (v128.const f32x4 0x1p112 0x1p112 0x1p112 0x1p112))
                  (i32x4.ge_u (local.get $mag) (v128.const i32x4 0x0f800000 0x0f800000 0x0f800000 0x0f800000))))))
            (else (local.set $x (v128.load (local.get $p)))))
          (local.set $c (i32x4.add (i32x4.trunc_sat_f32x4_s (f32x4.nearest (f32x4.mul (local.get $x) (local.get $inv)))) (local.get $zero)))
          (local.set $c (i16x8.narrow_i32x4_s (local.get $c) (local.get $c)))
          (v128.store32_lane 0 (local.get $codes) (i8x16.narrow_i16x8_u (local.get $c) (local.get $c)))
          (local.set $codes (i32.add (local.get $codes) (i32.const 4)))
          (local.set $p (i32.add (local.get $p) (local.get $step)))
          (br_if $quant (i32.lt_u (local.get $p) (local.get $end))))
        (local.set $src (local.get $end))
        (local.set $scales (i32.add (local.get $scales) (i32.const 4)))
        (local.set $zeros (i32.add (local.get $zeros) (i32.const 1)))
        (local.set $blocks (i32.sub (local.get $blocks) (i32.const 1)))
        (br $block))))
  ;; int4 (q4): quantizeRows's asymmetric search (q4Block in model/quantize.ts) for four blocks at once, one per
  ;; f32 lane, each lane doing the reference's own float32 operations in its order (the reference rounds every
  ;; double result with Math.fround): the same scales, zero points and codes, bit for bit. Its branches become lane
  ;; masks: a lane whose trial has Σd² = 0 computes on, unused. Codes round half to even
  ;; (f32x4.nearest, one instruction; the reference's roundEven). The zero point rounds half away from zero:
  ;; Math.round(v ≥ 0) is floor(v) + (v − floor(v) ≥ 0.5), exact in float32; roundAway is that on |x|, signed back.
  ;; Lanes past the last block repeat it. `width` 2: binary16 weights, widened exactly on load (as the reference's table does); 4: float32.
  ;; Out: the codes packed two a byte, low nibble first, blockSize / 2 bytes per block at `codes`; a float32 scale and
  ;; a zero-point byte per block; `tmp` holds the four blocks' values interleaved (16 bytes per weight of a block).
  (func (export "q4") (param $src i32) (param $width i32) (param $blocks i32) (param $bs i32) (param $codes i32) (param $scales i32) (param $zeros i32) (param $tmp i32)
    (local $p i32) (local $i i32) (local $end i32) (local $t i32) (local $last i32) (local $blob i32) (local $step i32)
    (local $a0 i32) (local $a1 i32) (local $a2 i32) (local $a3 i32)
    (local $x v128) (local $lo v128) (local $hi v128) (local $sxx v128) (local $best v128) (local $outScale v128) (local $outZero v128)
    (local $valid v128) (local $inv v128) (local $nlo v128) (local $base v128) (local $y v128) (local $ya v128) (local $yf v128)
    (local $h v128) (local $mag v128) (local $x0 v128) (local $x1 v128) (local $x2 v128) (local $x3 v128) (local $t0 v128) (local $t1 v128) (local $t2 v128) (local $t3 v128)
    (local $d v128) (local $e v128) (local $zeroA v128) (local $zeroB v128) (local $invA v128) (local $invB v128) (local $hiZA v128) (local $loZA v128) (local $hiZB v128) (local $loZB v128) (local $sxdA v128) (local $sddA v128) (local $sxdB v128) (local $sddB v128) (local $err v128) (local $upd v128) (local $c v128)
    (local.set $end (i32.add (local.get $tmp) (i32.shl (local.get $bs) (i32.const 4))))
    (local.set $last (i32.sub (local.get $blocks) (i32.const 1)))
    (local.set $blob (i32.shr_u (local.get $bs) (i32.const 1)))
    (local.set $step (i32.shl (local.get $width) (i32.const 2)))
    (block $done
      (loop $quad
        (br_if $done (i32.ge_u (local.get $p) (local.get $blocks)))
        ;; the four lanes' weights, at width bytes each
        (local.set $a0 (i32.add (local.get $src) (i32.mul (i32.mul (local.get $p) (local.get $bs)) (local.get $width))))
        (local.set $a1 (i32.add (local.get $src) (i32.mul (i32.mul (select (i32.add (local.get $p) (i32.const 1)) (local.get $last) (i32.lt_u (i32.add (local.get $p) (i32.const 1)) (local.get $last))) (local.get $bs)) (local.get $width))))
        (local.set $a2 (i32.add (local.get $src) (i32.mul (i32.mul (select (i32.add (local.get $p) (i32.const 2)) (local.get $last) (i32.lt_u (i32.add (local.get $p) (i32.const 2)) (local.get $last))) (local.get $bs)) (local.get $width))))
        (local.set $a3 (i32.add (local.get $src) (i32.mul (i32.mul (select (i32.add (local.get $p) (i32.const 3)) (local.get $last) (i32.lt_u (i32.add (local.get $p) (i32.const 3)) (local.get $last))) (local.get $bs)) (local.get $width))))
        ;; lo, hi (NaNs skipped), Σx², and the four blocks interleaved
        (local.set $lo (v128.const f32x4 0 0 0 0))
        (local.set $hi (v128.const f32x4 0 0 0 0))
        (local.set $sxx (v128.const f32x4 0 0 0 0))
        (local.set $i (local.get $tmp))
        ;; 4 weights of each block a step: loaded whole, transposed into 4 vectors of one weight per block (lane), in
        ;; the blocks' order; min and max by pmin/pmax (x < lo ? x : lo, as the reference's comparison), Σx² in order.
        (loop $scan
          (if (i32.eq (local.get $width) (i32.const 2))
            (then
              ;; [a0 b0 a1 b1 a2 b2 a3 b3] and [c0 d0 …] as i16, then [a0 b0 c0 d0 a1 b1 c1 d1] and [a2 b2 c2 d2 a3 b3 c3 d3];
              ;; each half zero-extended to i32 and widened exactly, written out (no call): the magnitude's bits moved
              ;; into float32's place and scaled by 2^112 (subnormals included); infinities and NaNs keep an all-ones
              ;; exponent (the reference's table gives the same values).
              (local.set $t0 (i8x16.shuffle 0 1 16 17 2 3 18 19 4 5 20 21 6 7 22 23 (v128.load64_zero (local.get $a0)) (v128.load64_zero (local.get $a1))))
              (local.set $t1 (i8x16.shuffle 0 1 16 17 2 3 18 19 4 5 20 21 6 7 22 23 (v128.load64_zero (local.get $a2)) (v128.load64_zero (local.get $a3))))
              (local.set $t2 (i8x16.shuffle 0 1 2 3 16 17 18 19 4 5 6 7 20 21 22 23 (local.get $t0) (local.get $t1)))
              (local.set $t3 (i8x16.shuffle 8 9 10 11 24 25 26 27 12 13 14 15 28 29 30 31 (local.get $t0) (local.get $t1)))
              (local.set $x0 (v128.or
                (i32x4.shl (v128.and (local.tee $h (i32x4.extend_low_i16x8_u (local.get $t2))) (v128.const i32x4 0x8000 0x8000 0x8000 0x8000)) (i32.const 16))
                (v128.bitselect
                  (i32x4.add (local.tee $mag (i32x4.shl (v128.and (local.get $h) (v128.const i32x4 0x7fff 0x7fff 0x7fff 0x7fff)) (i32.const 13))) (v128.const i32x4 0x70000000 0x70000000 0x70000000 0x70000000))
                  (f32x4.mul (local.get $mag) (v128.const f32x4 0x1p112 0x1p112 0x1p112 0x1p112))
                  (i32x4.ge_u (local.get $mag) (v128.const i32x4 0x0f800000 0x0f800000 0x0f800000 0x0f800000)))))
              (local.set $x1 (v128.or
                (i32x4.shl (v128.and (local.tee $h (i32x4.extend_high_i16x8_u (local.get $t2))) (v128.const i32x4 0x8000 0x8000 0x8000 0x8000)) (i32.const 16))
                (v128.bitselect
                  (i32x4.add (local.tee $mag (i32x4.shl (v128.and (local.get $h) (v128.const i32x4 0x7fff 0x7fff 0x7fff 0x7fff)) (i32.const 13))) (v128.const i32x4 0x70000000 0x70000000 0x70000000 0x70000000))
                  (f32x4.mul (local.get $mag) (v128.const f32x4 0x1p112 0x1p112 0x1p112 0x1p112))
                  (i32x4.ge_u (local.get $mag) (v128.const i32x4 0x0f800000 0x0f800000 0x0f800000 0x0f800000)))))
              (local.set $x2 (v128.or
                (i32x4.shl (v128.and (local.tee $h (i32x4.extend_low_i16x8_u (local.get $t3))) (v128.const i32x4 0x8000 0x8000 0x8000 0x8000)) (i32.const 16))
                (v128.bitselect
                  (i32x4.add (local.tee $mag (i32x4.shl (v128.and (local.get $h) (v128.const i32x4 0x7fff 0x7fff 0x7fff 0x7fff)) (i32.const 13))) (v128.const i32x4 0x70000000 0x70000000 0x70000000 0x70000000))
                  (f32x4.mul (local.get $mag) (v128.const f32x4 0x1p112 0x1p112 0x1p112 0x1p112))
                  (i32x4.ge_u (local.get $mag) (v128.const i32x4 0x0f800000 0x0f800000 0x0f800000 0x0f800000)))))
              (local.set $x3 (v128.or
                (i32x4.shl (v128.and (local.tee $h (i32x4.extend_high_i16x8_u (local.get $t3))) (v128.const i32x4 0x8000 0x8000 0x8000 0x8000)) (i32.const 16))
                (v128.bitselect
                  (i32x4.add (local.tee $mag (i32x4.shl (v128.and (local.get $h) (v128.const i32x4 0x7fff 0x7fff 0x7fff 0x7fff)) (i32.const 13))) (v128.const i32x4 0x70000000 0x70000000 0x70000000 0x70000000))
                  (f32x4.mul (local.get $mag) (v128.const f32x4 0x1p112 0x1p112 0x1p112 0x1p112))
                  (i32x4.ge_u (local.get $mag) (v128.const i32x4 0x0f800000 0x0f800000 0x0f800000 0x0f800000))))))
            (else
              (local.set $x0 (v128.load (local.get $a0)))
              (local.set $x1 (v128.load (local.get $a1)))
              (local.set $x2 (v128.load (local.get $a2)))
              (local.set $x3 (v128.load (local.get $a3)))
              ;; [a0 b0 a1 b1], [a2 b2 a3 b3], [c0 d0 c1 d1], [c2 d2 c3 d3] → [a0 b0 c0 d0], [a1 b1 c1 d1], …
              (local.set $t0 (i8x16.shuffle 0 1 2 3 16 17 18 19 4 5 6 7 20 21 22 23 (local.get $x0) (local.get $x1)))
              (local.set $t1 (i8x16.shuffle 8 9 10 11 24 25 26 27 12 13 14 15 28 29 30 31 (local.get $x0) (local.get $x1)))
              (local.set $t2 (i8x16.shuffle 0 1 2 3 16 17 18 19 4 5 6 7 20 21 22 23 (local.get $x2) (local.get $x3)))
              (local.set $t3 (i8x16.shuffle 8 9 10 11 24 25 26 27 12 13 14 15 28 29 30 31 (local.get $x2) (local.get $x3)))
              (local.set $x0 (i8x16.shuffle 0 1 2 3 4 5 6 7 16 17 18 19 20 21 22 23 (local.get $t0) (local.get $t2)))
              (local.set $x1 (i8x16.shuffle 8 9 10 11 12 13 14 15 24 25 26 27 28 29 30 31 (local.get $t0) (local.get $t2)))
              (local.set $x2 (i8x16.shuffle 0 1 2 3 4 5 6 7 16 17 18 19 20 21 22 23 (local.get $t1) (local.get $t3)))
              (local.set $x3 (i8x16.shuffle 8 9 10 11 12 13 14 15 24 25 26 27 28 29 30 31 (local.get $t1) (local.get $t3)))))
          (v128.store (local.get $i) (local.get $x0))
          (v128.store offset=16 (local.get $i) (local.get $x1))
          (v128.store offset=32 (local.get $i) (local.get $x2))
          (v128.store offset=48 (local.get $i) (local.get $x3))
          (local.set $lo (f32x4.pmin (f32x4.pmin (f32x4.pmin (f32x4.pmin (local.get $lo) (local.get $x0)) (local.get $x1)) (local.get $x2)) (local.get $x3)))
          (local.set $hi (f32x4.pmax (f32x4.pmax (f32x4.pmax (f32x4.pmax (local.get $hi) (local.get $x0)) (local.get $x1)) (local.get $x2)) (local.get $x3)))
          (local.set $sxx (f32x4.add (f32x4.add (f32x4.add (f32x4.add (local.get $sxx)
            (f32x4.mul (local.get $x0) (local.get $x0))) (f32x4.mul (local.get $x1) (local.get $x1))) (f32x4.mul (local.get $x2) (local.get $x2))) (f32x4.mul (local.get $x3) (local.get $x3))))
          (local.set $a0 (i32.add (local.get $a0) (local.get $step)))
          (local.set $a1 (i32.add (local.get $a1) (local.get $step)))
          (local.set $a2 (i32.add (local.get $a2) (local.get $step)))
          (local.set $a3 (i32.add (local.get $a3) (local.get $step)))
          (local.set $i (i32.add (local.get $i) (i32.const 64)))
          (br_if $scan (i32.lt_u (local.get $i) (local.get $end))))
        (local.set $outScale (v128.const f32x4 0 0 0 0))
        (local.set $outZero (v128.const f32x4 8 8 8 8))
        (local.set $valid (f32x4.gt (local.get $hi) (local.get $lo)))
        (local.set $best (local.get $sxx))
        ;; 5 trial scales from ×1.1 to ×0.96 of (hi − lo) / 15, then q4_0's own (t = 5), two trials a pass over the
        ;; block (independent sums, so twice the work in flight), each trial's best-fit update then made in trial order.
        ;; The three passes are written out, with no calls: V8 does not inline calls (they took a sixth of the time),
        ;; and as a loop the passes ran ~20 % slower. Trial t < 5: scale (hi − lo) / 15 × fl32(1.1 − 0.035 t) (below as
        ;; float32 constants), zero point clamp(roundAway(−lo / scale), 0, 15); t = 5, q4_0's: scale (hi ≥ −lo ? hi :
        ;; lo) / −8, zero point 8. A trial's code offsets: d = q4Code(x · inv, zero) − zero, as clamp(nearest(x · inv),
        ;; −zero, 15 − zero) (the same numbers: codes are small integers, exact; a NaN passes through pmin/pmax; a
        ;; clamped −0 adds as +0 does).
        (local.set $nlo (f32x4.neg (local.get $lo)))
        (local.set $base (f32x4.div (f32x4.sub (local.get $hi) (local.get $lo)) (v128.const f32x4 15 15 15 15)))
        ;; trials 0 (A) and 1 (B); $inv holds the scale until it is inverted
          (local.set $invA (f32x4.mul (local.get $base) (v128.const f32x4 0x1.19999a0000000p+0 0x1.19999a0000000p+0 0x1.19999a0000000p+0 0x1.19999a0000000p+0)))
          (local.set $y (f32x4.div (local.get $nlo) (local.get $invA)))
          (local.set $ya (f32x4.abs (local.get $y)))
          (local.set $yf (f32x4.floor (local.get $ya)))
          (local.set $zeroA (f32x4.max (v128.const f32x4 0 0 0 0) (f32x4.min (v128.const f32x4 15 15 15 15)
            (v128.or (v128.and (local.get $y) (v128.const i32x4 0x80000000 0x80000000 0x80000000 0x80000000))
              (f32x4.add (local.get $yf) (v128.and (f32x4.ge (f32x4.sub (local.get $ya) (local.get $yf)) (v128.const f32x4 0.5 0.5 0.5 0.5)) (v128.const f32x4 1 1 1 1)))))))
          (local.set $invB (f32x4.mul (local.get $base) (v128.const f32x4 0x1.10a3d80000000p+0 0x1.10a3d80000000p+0 0x1.10a3d80000000p+0 0x1.10a3d80000000p+0)))
          (local.set $y (f32x4.div (local.get $nlo) (local.get $invB)))
          (local.set $ya (f32x4.abs (local.get $y)))
          (local.set $yf (f32x4.floor (local.get $ya)))
          (local.set $zeroB (f32x4.max (v128.const f32x4 0 0 0 0) (f32x4.min (v128.const f32x4 15 15 15 15)
            (v128.or (v128.and (local.get $y) (v128.const i32x4 0x80000000 0x80000000 0x80000000 0x80000000))
              (f32x4.add (local.get $yf) (v128.and (f32x4.ge (f32x4.sub (local.get $ya) (local.get $yf)) (v128.const f32x4 0.5 0.5 0.5 0.5)) (v128.const f32x4 1 1 1 1)))))))
          (local.set $invA (f32x4.div (v128.const f32x4 1 1 1 1) (local.get $invA)))
          (local.set $invB (f32x4.div (v128.const f32x4 1 1 1 1) (local.get $invB)))
          (local.set $hiZA (f32x4.sub (v128.const f32x4 15 15 15 15) (local.get $zeroA)))
          (local.set $loZA (f32x4.neg (local.get $zeroA)))
          (local.set $hiZB (f32x4.sub (v128.const f32x4 15 15 15 15) (local.get $zeroB)))
          (local.set $loZB (f32x4.neg (local.get $zeroB)))
          (local.set $sxdA (v128.const f32x4 0 0 0 0))
          (local.set $sddA (v128.const f32x4 0 0 0 0))
          (local.set $sxdB (v128.const f32x4 0 0 0 0))
          (local.set $sddB (v128.const f32x4 0 0 0 0))
          (local.set $i (local.get $tmp))
          (loop $sum0
            (local.set $x (v128.load offset=0 (local.get $i)))
            (local.set $d (f32x4.pmax (f32x4.pmin (f32x4.nearest (f32x4.mul (local.get $x) (local.get $invA))) (local.get $hiZA)) (local.get $loZA)))
            (local.set $e (f32x4.pmax (f32x4.pmin (f32x4.nearest (f32x4.mul (local.get $x) (local.get $invB))) (local.get $hiZB)) (local.get $loZB)))
            (local.set $sxdA (f32x4.add (local.get $sxdA) (f32x4.mul (local.get $x) (local.get $d))))
            (local.set $sddA (f32x4.add (local.get $sddA) (f32x4.mul (local.get $d) (local.get $d))))
            (local.set $sxdB (f32x4.add (local.get $sxdB) (f32x4.mul (local.get $x) (local.get $e))))
            (local.set $sddB (f32x4.add (local.get $sddB) (f32x4.mul (local.get $e) (local.get $e))))
            (local.set $x (v128.load offset=16 (local.get $i)))
            (local.set $d (f32x4.pmax (f32x4.pmin (f32x4.nearest (f32x4.mul (local.get $x) (local.get $invA))) (local.get $hiZA)) (local.get $loZA)))
            (local.set $e (f32x4.pmax (f32x4.pmin (f32x4.nearest (f32x4.mul (local.get $x) (local.get $invB))) (local.get $hiZB)) (local.get $loZB)))
            (local.set $sxdA (f32x4.add (local.get $sxdA) (f32x4.mul (local.get $x) (local.get $d))))
            (local.set $sddA (f32x4.add (local.get $sddA) (f32x4.mul (local.get $d) (local.get $d))))
            (local.set $sxdB (f32x4.add (local.get $sxdB) (f32x4.mul (local.get $x) (local.get $e))))
            (local.set $sddB (f32x4.add (local.get $sddB) (f32x4.mul (local.get $e) (local.get $e))))
            (local.set $i (i32.add (local.get $i) (i32.const 32)))
            (br_if $sum0 (i32.lt_u (local.get $i) (local.get $end))))
          (local.set $err (f32x4.sub (local.get $sxx) (f32x4.div (f32x4.mul (local.get $sxdA) (local.get $sxdA)) (local.get $sddA))))
          (local.set $upd (v128.and (v128.and (local.get $valid) (f32x4.gt (local.get $sddA) (v128.const f32x4 0 0 0 0))) (f32x4.lt (local.get $err) (local.get $best))))
          (local.set $best (v128.bitselect (local.get $err) (local.get $best) (local.get $upd)))
          (local.set $outScale (v128.bitselect (f32x4.div (local.get $sxdA) (local.get $sddA)) (local.get $outScale) (local.get $upd)))
          (local.set $outZero (v128.bitselect (local.get $zeroA) (local.get $outZero) (local.get $upd)))
          (local.set $err (f32x4.sub (local.get $sxx) (f32x4.div (f32x4.mul (local.get $sxdB) (local.get $sxdB)) (local.get $sddB))))
          (local.set $upd (v128.and (v128.and (local.get $valid) (f32x4.gt (local.get $sddB) (v128.const f32x4 0 0 0 0))) (f32x4.lt (local.get $err) (local.get $best))))
          (local.set $best (v128.bitselect (local.get $err) (local.get $best) (local.get $upd)))
          (local.set $outScale (v128.bitselect (f32x4.div (local.get $sxdB) (local.get $sddB)) (local.get $outScale) (local.get $upd)))
          (local.set $outZero (v128.bitselect (local.get $zeroB) (local.get $outZero) (local.get $upd)))
        ;; trials 2 (A) and 3 (B); $inv holds the scale until it is inverted
          (local.set $invA (f32x4.mul (local.get $base) (v128.const f32x4 0x1.07ae140000000p+0 0x1.07ae140000000p+0 0x1.07ae140000000p+0 0x1.07ae140000000p+0)))
          (local.set $y (f32x4.div (local.get $nlo) (local.get $invA)))
          (local.set $ya (f32x4.abs (local.get $y)))
          (local.set $yf (f32x4.floor (local.get $ya)))
          (local.set $zeroA (f32x4.max (v128.const f32x4 0 0 0 0) (f32x4.min (v128.const f32x4 15 15 15 15)
            (v128.or (v128.and (local.get $y) (v128.const i32x4 0x80000000 0x80000000 0x80000000 0x80000000))
              (f32x4.add (local.get $yf) (v128.and (f32x4.ge (f32x4.sub (local.get $ya) (local.get $yf)) (v128.const f32x4 0.5 0.5 0.5 0.5)) (v128.const f32x4 1 1 1 1)))))))
          (local.set $invB (f32x4.mul (local.get $base) (v128.const f32x4 0x1.fd70a40000000p-1 0x1.fd70a40000000p-1 0x1.fd70a40000000p-1 0x1.fd70a40000000p-1)))
          (local.set $y (f32x4.div (local.get $nlo) (local.get $invB)))
          (local.set $ya (f32x4.abs (local.get $y)))
          (local.set $yf (f32x4.floor (local.get $ya)))
          (local.set $zeroB (f32x4.max (v128.const f32x4 0 0 0 0) (f32x4.min (v128.const f32x4 15 15 15 15)
            (v128.or (v128.and (local.get $y) (v128.const i32x4 0x80000000 0x80000000 0x80000000 0x80000000))
              (f32x4.add (local.get $yf) (v128.and (f32x4.ge (f32x4.sub (local.get $ya) (local.get $yf)) (v128.const f32x4 0.5 0.5 0.5 0.5)) (v128.const f32x4 1 1 1 1)))))))
          (local.set $invA (f32x4.div (v128.const f32x4 1 1 1 1) (local.get $invA)))
          (local.set $invB (f32x4.div (v128.const f32x4 1 1 1 1) (local.get $invB)))
          (local.set $hiZA (f32x4.sub (v128.const f32x4 15 15 15 15) (local.get $zeroA)))
          (local.set $loZA (f32x4.neg (local.get $zeroA)))
          (local.set $hiZB (f32x4.sub (v128.const f32x4 15 15 15 15) (local.get $zeroB)))
          (local.set $loZB (f32x4.neg (local.get $zeroB)))
          (local.set $sxdA (v128.const f32x4 0 0 0 0))
          (local.set $sddA (v128.const f32x4 0 0 0 0))
          (local.set $sxdB (v128.const f32x4 0 0 0 0))
          (local.set $sddB (v128.const f32x4 0 0 0 0))
          (local.set $i (local.get $tmp))
          (loop $sum2
            (local.set $x (v128.load offset=0 (local.get $i)))
            (local.set $d (f32x4.pmax (f32x4.pmin (f32x4.nearest (f32x4.mul (local.get $x) (local.get $invA))) (local.get $hiZA)) (local.get $loZA)))
            (local.set $e (f32x4.pmax (f32x4.pmin (f32x4.nearest (f32x4.mul (local.get $x) (local.get $invB))) (local.get $hiZB)) (local.get $loZB)))
            (local.set $sxdA (f32x4.add (local.get $sxdA) (f32x4.mul (local.get $x) (local.get $d))))
            (local.set $sddA (f32x4.add (local.get $sddA) (f32x4.mul (local.get $d) (local.get $d))))
            (local.set $sxdB (f32x4.add (local.get $sxdB) (f32x4.mul (local.get $x) (local.get $e))))
            (local.set $sddB (f32x4.add (local.get $sddB) (f32x4.mul (local.get $e) (local.get $e))))
            (local.set $x (v128.load offset=16 (local.get $i)))
            (local.set $d (f32x4.pmax (f32x4.pmin (f32x4.nearest (f32x4.mul (local.get $x) (local.get $invA))) (local.get $hiZA)) (local.get $loZA)))
            (local.set $e (f32x4.pmax (f32x4.pmin (f32x4.nearest (f32x4.mul (local.get $x) (local.get $invB))) (local.get $hiZB)) (local.get $loZB)))
            (local.set $sxdA (f32x4.add (local.get $sxdA) (f32x4.mul (local.get $x) (local.get $d))))
            (local.set $sddA (f32x4.add (local.get $sddA) (f32x4.mul (local.get $d) (local.get $d))))
            (local.set $sxdB (f32x4.add (local.get $sxdB) (f32x4.mul (local.get $x) (local.get $e))))
            (local.set $sddB (f32x4.add (local.get $sddB) (f32x4.mul (local.get $e) (local.get $e))))
            (local.set $i (i32.add (local.get $i) (i32.const 32)))
            (br_if $sum2 (i32.lt_u (local.get $i) (local.get $end))))
          (local.set $err (f32x4.sub (local.get $sxx) (f32x4.div (f32x4.mul (local.get $sxdA) (local.get $sxdA)) (local.get $sddA))))
          (local.set $upd (v128.and (v128.and (local.get $valid) (f32x4.gt (local.get $sddA) (v128.const f32x4 0 0 0 0))) (f32x4.lt (local.get $err) (local.get $best))))
          (local.set $best (v128.bitselect (local.get $err) (local.get $best) (local.get $upd)))
          (local.set $outScale (v128.bitselect (f32x4.div (local.get $sxdA) (local.get $sddA)) (local.get $outScale) (local.get $upd)))
          (local.set $outZero (v128.bitselect (local.get $zeroA) (local.get $outZero) (local.get $upd)))
          (local.set $err (f32x4.sub (local.get $sxx) (f32x4.div (f32x4.mul (local.get $sxdB) (local.get $sxdB)) (local.get $sddB))))
          (local.set $upd (v128.and (v128.and (local.get $valid) (f32x4.gt (local.get $sddB) (v128.const f32x4 0 0 0 0))) (f32x4.lt (local.get $err) (local.get $best))))
          (local.set $best (v128.bitselect (local.get $err) (local.get $best) (local.get $upd)))
          (local.set $outScale (v128.bitselect (f32x4.div (local.get $sxdB) (local.get $sddB)) (local.get $outScale) (local.get $upd)))
          (local.set $outZero (v128.bitselect (local.get $zeroB) (local.get $outZero) (local.get $upd)))
        ;; trials 4 (A) and 5 (B); $inv holds the scale until it is inverted
          (local.set $invA (f32x4.mul (local.get $base) (v128.const f32x4 0x1.eb851e0000000p-1 0x1.eb851e0000000p-1 0x1.eb851e0000000p-1 0x1.eb851e0000000p-1)))
          (local.set $y (f32x4.div (local.get $nlo) (local.get $invA)))
          (local.set $ya (f32x4.abs (local.get $y)))
          (local.set $yf (f32x4.floor (local.get $ya)))
          (local.set $zeroA (f32x4.max (v128.const f32x4 0 0 0 0) (f32x4.min (v128.const f32x4 15 15 15 15)
            (v128.or (v128.and (local.get $y) (v128.const i32x4 0x80000000 0x80000000 0x80000000 0x80000000))
              (f32x4.add (local.get $yf) (v128.and (f32x4.ge (f32x4.sub (local.get $ya) (local.get $yf)) (v128.const f32x4 0.5 0.5 0.5 0.5)) (v128.const f32x4 1 1 1 1)))))))
          (local.set $invB (f32x4.div (v128.bitselect (local.get $hi) (local.get $lo) (f32x4.ge (local.get $hi) (local.get $nlo))) (v128.const f32x4 -8 -8 -8 -8)))
          (local.set $zeroB (v128.const f32x4 8 8 8 8))
          (local.set $invA (f32x4.div (v128.const f32x4 1 1 1 1) (local.get $invA)))
          (local.set $invB (f32x4.div (v128.const f32x4 1 1 1 1) (local.get $invB)))
          (local.set $hiZA (f32x4.sub (v128.const f32x4 15 15 15 15) (local.get $zeroA)))
          (local.set $loZA (f32x4.neg (local.get $zeroA)))
          (local.set $hiZB (f32x4.sub (v128.const f32x4 15 15 15 15) (local.get $zeroB)))
          (local.set $loZB (f32x4.neg (local.get $zeroB)))
          (local.set $sxdA (v128.const f32x4 0 0 0 0))
          (local.set $sddA (v128.const f32x4 0 0 0 0))
          (local.set $sxdB (v128.const f32x4 0 0 0 0))
          (local.set $sddB (v128.const f32x4 0 0 0 0))
          (local.set $i (local.get $tmp))
          (loop $sum4
            (local.set $x (v128.load offset=0 (local.get $i)))
            (local.set $d (f32x4.pmax (f32x4.pmin (f32x4.nearest (f32x4.mul (local.get $x) (local.get $invA))) (local.get $hiZA)) (local.get $loZA)))
            (local.set $e (f32x4.pmax (f32x4.pmin (f32x4.nearest (f32x4.mul (local.get $x) (local.get $invB))) (local.get $hiZB)) (local.get $loZB)))
            (local.set $sxdA (f32x4.add (local.get $sxdA) (f32x4.mul (local.get $x) (local.get $d))))
            (local.set $sddA (f32x4.add (local.get $sddA) (f32x4.mul (local.get $d) (local.get $d))))
            (local.set $sxdB (f32x4.add (local.get $sxdB) (f32x4.mul (local.get $x) (local.get $e))))
            (local.set $sddB (f32x4.add (local.get $sddB) (f32x4.mul (local.get $e) (local.get $e))))
            (local.set $x (v128.load offset=16 (local.get $i)))
            (local.set $d (f32x4.pmax (f32x4.pmin (f32x4.nearest (f32x4.mul (local.get $x) (local.get $invA))) (local.get $hiZA)) (local.get $loZA)))
            (local.set $e (f32x4.pmax (f32x4.pmin (f32x4.nearest (f32x4.mul (local.get $x) (local.get $invB))) (local.get $hiZB)) (local.get $loZB)))
            (local.set $sxdA (f32x4.add (local.get $sxdA) (f32x4.mul (local.get $x) (local.get $d))))
            (local.set $sddA (f32x4.add (local.get $sddA) (f32x4.mul (local.get $d) (local.get $d))))
            (local.set $sxdB (f32x4.add (local.get $sxdB) (f32x4.mul (local.get $x) (local.get $e))))
            (local.set $sddB (f32x4.add (local.get $sddB) (f32x4.mul (local.get $e) (local.get $e))))
            (local.set $i (i32.add (local.get $i) (i32.const 32)))
            (br_if $sum4 (i32.lt_u (local.get $i) (local.get $end))))
          (local.set $err (f32x4.sub (local.get $sxx) (f32x4.div (f32x4.mul (local.get $sxdA) (local.get $sxdA)) (local.get $sddA))))
          (local.set $upd (v128.and (v128.and (local.get $valid) (f32x4.gt (local.get $sddA) (v128.const f32x4 0 0 0 0))) (f32x4.lt (local.get $err) (local.get $best))))
          (local.set $best (v128.bitselect (local.get $err) (local.get $best) (local.get $upd)))
          (local.set $outScale (v128.bitselect (f32x4.div (local.get $sxdA) (local.get $sddA)) (local.get $outScale) (local.get $upd)))
          (local.set $outZero (v128.bitselect (local.get $zeroA) (local.get $outZero) (local.get $upd)))
          (local.set $err (f32x4.sub (local.get $sxx) (f32x4.div (f32x4.mul (local.get $sxdB) (local.get $sxdB)) (local.get $sddB))))
          (local.set $upd (v128.and (v128.and (local.get $valid) (f32x4.gt (local.get $sddB) (v128.const f32x4 0 0 0 0))) (f32x4.lt (local.get $err) (local.get $best))))
          (local.set $best (v128.bitselect (local.get $err) (local.get $best) (local.get $upd)))
          (local.set $outScale (v128.bitselect (f32x4.div (local.get $sxdB) (local.get $sddB)) (local.get $outScale) (local.get $upd)))
          (local.set $outZero (v128.bitselect (local.get $zeroB) (local.get $outZero) (local.get $upd)))
        ;; the codes of the best fit (inv = scale ? 1 / scale : 0), two weights a byte, low nibble first
        (local.set $inv (v128.and (f32x4.div (v128.const f32x4 1 1 1 1) (local.get $outScale)) (f32x4.ne (local.get $outScale) (v128.const f32x4 0 0 0 0))))
        (local.set $a0 (i32.add (local.get $codes) (i32.mul (local.get $p) (local.get $blob))))
        (local.set $a1 (i32.add (local.get $codes) (i32.mul (select (i32.add (local.get $p) (i32.const 1)) (local.get $last) (i32.lt_u (i32.add (local.get $p) (i32.const 1)) (local.get $last))) (local.get $blob))))
        (local.set $a2 (i32.add (local.get $codes) (i32.mul (select (i32.add (local.get $p) (i32.const 2)) (local.get $last) (i32.lt_u (i32.add (local.get $p) (i32.const 2)) (local.get $last))) (local.get $blob))))
        (local.set $a3 (i32.add (local.get $codes) (i32.mul (select (i32.add (local.get $p) (i32.const 3)) (local.get $last) (i32.lt_u (i32.add (local.get $p) (i32.const 3)) (local.get $last))) (local.get $blob))))
        (local.set $i (local.get $tmp))
        ;; 4 weights a lane a step, 2 bytes: q4Code written out (no call), its clamp as pmax(0, pmin(v, 15)), which
        ;; makes a NaN 0 (0 < NaN is false), and the integer code read off the float's low bits after adding 2^23.
        (loop $code
          (local.set $x0 (f32x4.add (f32x4.pmax (v128.const f32x4 0 0 0 0) (f32x4.pmin (f32x4.add (f32x4.nearest (f32x4.mul (v128.load (local.get $i)) (local.get $inv))) (local.get $outZero)) (v128.const f32x4 15 15 15 15))) (v128.const f32x4 0x1p23 0x1p23 0x1p23 0x1p23)))
          (local.set $x1 (f32x4.add (f32x4.pmax (v128.const f32x4 0 0 0 0) (f32x4.pmin (f32x4.add (f32x4.nearest (f32x4.mul (v128.load offset=16 (local.get $i)) (local.get $inv))) (local.get $outZero)) (v128.const f32x4 15 15 15 15))) (v128.const f32x4 0x1p23 0x1p23 0x1p23 0x1p23)))
          (local.set $x2 (f32x4.add (f32x4.pmax (v128.const f32x4 0 0 0 0) (f32x4.pmin (f32x4.add (f32x4.nearest (f32x4.mul (v128.load offset=32 (local.get $i)) (local.get $inv))) (local.get $outZero)) (v128.const f32x4 15 15 15 15))) (v128.const f32x4 0x1p23 0x1p23 0x1p23 0x1p23)))
          (local.set $x3 (f32x4.add (f32x4.pmax (v128.const f32x4 0 0 0 0) (f32x4.pmin (f32x4.add (f32x4.nearest (f32x4.mul (v128.load offset=48 (local.get $i)) (local.get $inv))) (local.get $outZero)) (v128.const f32x4 15 15 15 15))) (v128.const f32x4 0x1p23 0x1p23 0x1p23 0x1p23)))
          ;; per lane: byte 0 = code(x0) | code(x1) << 4, byte 1 = code(x2) | code(x3) << 4
          (local.set $c
            (v128.or (v128.or (local.get $x0) (i32x4.shl (local.get $x1) (i32.const 4))) (i32x4.shl (v128.or (local.get $x2) (i32x4.shl (local.get $x3) (i32.const 4))) (i32.const 8))))
          (i32.store16 (local.get $a0) (i16x8.extract_lane_u 0 (local.get $c)))
          (i32.store16 (local.get $a1) (i16x8.extract_lane_u 2 (local.get $c)))
          (i32.store16 (local.get $a2) (i16x8.extract_lane_u 4 (local.get $c)))
          (i32.store16 (local.get $a3) (i16x8.extract_lane_u 6 (local.get $c)))
          (local.set $a0 (i32.add (local.get $a0) (i32.const 2)))
          (local.set $a1 (i32.add (local.get $a1) (i32.const 2)))
          (local.set $a2 (i32.add (local.get $a2) (i32.const 2)))
          (local.set $a3 (i32.add (local.get $a3) (i32.const 2)))
          (local.set $i (i32.add (local.get $i) (i32.const 64)))
          (br_if $code (i32.lt_u (local.get $i) (local.get $end))))
        ;; scales and zero points of the lanes that are blocks (a repeated last block writes the same values again),
        ;; through tmp (its values are spent): a lane's index must be a constant to extract it
        (v128.store (local.get $tmp) (local.get $outScale))
        (v128.store offset=16 (local.get $tmp) (i32x4.trunc_sat_f32x4_s (local.get $outZero)))
        (local.set $i (i32.const 0))
        (loop $out
          (local.set $t (select (i32.add (local.get $p) (local.get $i)) (local.get $last) (i32.lt_u (i32.add (local.get $p) (local.get $i)) (local.get $last))))
          (local.set $a0 (i32.add (local.get $tmp) (i32.shl (local.get $i) (i32.const 2))))
          (f32.store (i32.add (local.get $scales) (i32.shl (local.get $t) (i32.const 2))) (f32.load (local.get $a0)))
          (i32.store8 (i32.add (local.get $zeros) (local.get $t)) (i32.load offset=16 (local.get $a0)))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br_if $out (i32.lt_u (local.get $i) (i32.const 4))))
        (local.set $p (i32.add (local.get $p) (i32.const 4)))
        (br $quad))))

  ;; Transpose of a band of a Conv1D matrix (model/graph/linear.ts, transposeInBands): `rows` stored rows of `n`
  ;; 32-bit values at `src` → column c of output row r at dst + (r·k + c)·4, in 4 × 4 tiles (bits moved, not values).
  ;; rows and n are multiples of 4.
  (func (export "t32") (param $src i32) (param $rows i32) (param $n i32) (param $dst i32) (param $k i32)
    (local $r i32) (local $c i32) (local $stride i32) (local $p i32) (local $o i32) (local $ostride i32)
    (local $a v128) (local $b v128) (local $x v128) (local $y v128) (local $t0 v128) (local $t1 v128) (local $t2 v128) (local $t3 v128)
    (local.set $stride (i32.shl (local.get $n) (i32.const 2)))
    (local.set $ostride (i32.shl (local.get $k) (i32.const 2)))
    (block $done
      (loop $rs
        (br_if $done (i32.ge_u (local.get $r) (local.get $n)))
        (local.set $c (i32.const 0))
        (block $cdone
          (loop $cs
            (br_if $cdone (i32.ge_u (local.get $c) (local.get $rows)))
            ;; the tile's four stored rows c..c+3, columns r..r+3
            (local.set $p (i32.add (local.get $src) (i32.shl (i32.add (i32.mul (local.get $c) (local.get $n)) (local.get $r)) (i32.const 2))))
            (local.set $a (v128.load (local.get $p)))
            (local.set $b (v128.load (i32.add (local.get $p) (local.get $stride))))
            (local.set $x (v128.load (i32.add (local.get $p) (i32.shl (local.get $stride) (i32.const 1)))))
            (local.set $y (v128.load (i32.add (local.get $p) (i32.mul (local.get $stride) (i32.const 3)))))
            ;; [a0 b0 a1 b1], [a2 b2 a3 b3], [x0 y0 x1 y1], [x2 y2 x3 y3]
            (local.set $t0 (i8x16.shuffle 0 1 2 3 16 17 18 19 4 5 6 7 20 21 22 23 (local.get $a) (local.get $b)))
            (local.set $t1 (i8x16.shuffle 8 9 10 11 24 25 26 27 12 13 14 15 28 29 30 31 (local.get $a) (local.get $b)))
            (local.set $t2 (i8x16.shuffle 0 1 2 3 16 17 18 19 4 5 6 7 20 21 22 23 (local.get $x) (local.get $y)))
            (local.set $t3 (i8x16.shuffle 8 9 10 11 24 25 26 27 12 13 14 15 28 29 30 31 (local.get $x) (local.get $y)))
            ;; output rows r..r+3, columns c..c+3: [a0 b0 x0 y0], [a1 b1 x1 y1], [a2 b2 x2 y2], [a3 b3 x3 y3]
            (local.set $o (i32.add (local.get $dst) (i32.shl (i32.add (i32.mul (local.get $r) (local.get $k)) (local.get $c)) (i32.const 2))))
            (v128.store (local.get $o) (i8x16.shuffle 0 1 2 3 4 5 6 7 16 17 18 19 20 21 22 23 (local.get $t0) (local.get $t2)))
            (v128.store (i32.add (local.get $o) (local.get $ostride)) (i8x16.shuffle 8 9 10 11 12 13 14 15 24 25 26 27 28 29 30 31 (local.get $t0) (local.get $t2)))
            (v128.store (i32.add (local.get $o) (i32.shl (local.get $ostride) (i32.const 1))) (i8x16.shuffle 0 1 2 3 4 5 6 7 16 17 18 19 20 21 22 23 (local.get $t1) (local.get $t3)))
            (v128.store (i32.add (local.get $o) (i32.mul (local.get $ostride) (i32.const 3))) (i8x16.shuffle 8 9 10 11 12 13 14 15 24 25 26 27 28 29 30 31 (local.get $t1) (local.get $t3)))
            (local.set $c (i32.add (local.get $c) (i32.const 4)))
            (br $cs)))
        (local.set $r (i32.add (local.get $r) (i32.const 4)))
        (br $rs))))
)
