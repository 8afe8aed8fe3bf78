package switchyard.example;

import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.GeneralSecurityException;
import java.security.MessageDigest;
import java.util.Arrays;
import java.util.HashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import javax.crypto.Mac;
import javax.crypto.spec.SecretKeySpec;
import org.apache.kafka.common.header.Header;

/**
 * Verifies Switchyard's edge signature ({@code sy-sig}, docs/protocol.md "Edge signature") with
 * the JDK's HMAC-SHA256: {@code v1=<hex>} over
 * {@code "v1\n" + for each SIGNED name: name "=" value "\n" + payload}, an absent header giving
 * an empty value. A record in which a signed header or {@code sy-sig} appears twice is refused.
 */
final class SySig {
  static final List<String> SIGNED = List.of(
      "sy-v", "sy-session", "sy-seq", "sy-kind", "sy-node", "sy-route", "sy-opcode", "sy-sub",
      "sy-claims", "sy-ts", "sy-code", "sy-reason", "sy-reply", "sy-inbound", "traceparent",
      "tracestate");
  static final String SIG = "sy-sig";

  private final SecretKeySpec key;

  SySig(byte[] key) {
    this.key = new SecretKeySpec(key, "HmacSHA256");
  }

  /**
   * The key as the edge reads its --identity-hmac-key-file: the file's bytes with leading and
   * trailing ASCII whitespace (space, \t, \n, \f, \r) removed, at least 32 bytes.
   */
  static byte[] readKeyFile(Path file) throws IOException {
    byte[] b = Files.readAllBytes(file);
    int from = 0;
    int to = b.length;
    while (from < to && isAsciiWhitespace(b[from])) from++;
    while (to > from && isAsciiWhitespace(b[to - 1])) to--;
    byte[] k = Arrays.copyOfRange(b, from, to);
    if (k.length < 32) {
      throw new IOException(file + " holds " + k.length + " bytes; the key needs at least 32");
    }
    return k;
  }

  private static boolean isAsciiWhitespace(byte c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\f' || c == '\r';
  }

  /** Null when the record's signature is good, else why it is refused. */
  String refusal(Iterable<Header> headers, byte[] payload) {
    Map<String, byte[]> seen = new HashMap<>();
    for (Header h : headers) {
      String name = h.key().toLowerCase(Locale.ROOT);
      if (seen.containsKey(name) && (SIGNED.contains(name) || name.equals(SIG))) {
        return name + " appears twice";
      }
      seen.put(name, h.value() == null ? new byte[0] : h.value());
    }
    byte[] sig = seen.get(SIG);
    if (sig == null) {
      return "no " + SIG;
    }
    String given = new String(sig, StandardCharsets.UTF_8);
    byte[] tag = given.startsWith("v1=") ? hex(given.substring(3)) : null;
    if (tag == null) {
      return "malformed " + SIG;
    }
    ByteArrayOutputStream text = new ByteArrayOutputStream();
    text.writeBytes("v1\n".getBytes(StandardCharsets.UTF_8));
    for (String name : SIGNED) {
      text.writeBytes((name + "=").getBytes(StandardCharsets.UTF_8));
      text.writeBytes(seen.getOrDefault(name, new byte[0]));
      text.write('\n');
    }
    text.writeBytes(payload);
    byte[] want;
    try {
      Mac mac = Mac.getInstance("HmacSHA256");
      mac.init(key);
      want = mac.doFinal(text.toByteArray());
    } catch (GeneralSecurityException e) {
      throw new IllegalStateException("HmacSHA256 is part of every JDK", e);
    }
    return MessageDigest.isEqual(want, tag) ? null : "bad signature";
  }

  /** 64 hex digits (either case, as the Rust verifier takes them) as 32 bytes, else null. */
  private static byte[] hex(String s) {
    if (s.length() != 64) {
      return null;
    }
    byte[] out = new byte[32];
    for (int i = 0; i < 32; i++) {
      int hi = hexDigit(s.charAt(2 * i));
      int lo = hexDigit(s.charAt(2 * i + 1));
      if (hi < 0 || lo < 0) {
        return null;
      }
      out[i] = (byte) (hi << 4 | lo);
    }
    return out;
  }

  private static int hexDigit(char c) {
    return c < 128 ? Character.digit(c, 16) : -1; // ASCII only: Character.digit takes any script
  }
}
